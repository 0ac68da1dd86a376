"""launch/colab/quickstart.ipynb runs top to bottom in a Jupyter kernel of this Python (the
demo scaled down, the HF checkpoint loaded, a chat answer, PyTorch's logits, a TPU plan), in
a temporary directory; the committed notebook holds no outputs."""
import importlib.util
import json
import os
import sys
import time

import pytest
from compile_flags import xla_flags

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
kernelspec = pytest.importorskip("ipykernel.kernelspec")

NOTEBOOK = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "launch", "colab", "quickstart.ipynb")
KERNEL = "mllm-jax-notebook-test"
CELL_TIMEOUT = 240  # seconds; the whole notebook takes about two minutes on two cores


def test_committed_notebook_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]
    # Magics would not run under plain nbclient / python.
    assert not any(line.lstrip().startswith(("!", "%")) for c in code
                   for line in c.source.splitlines())


def tagged(nb, tag):
    (cell,) = [c for c in nb.cells if tag in c.metadata.get("tags", [])]
    return cell


def text_of(cell, name="stdout"):
    return "".join(o.get("text", "") for o in cell.outputs
                   if o.output_type == "stream" and o.name == name)


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """The notebook after a run in a fresh kernel of this interpreter (its kernel spec
    installed into a temporary prefix that JUPYTER_PATH puts first), with cwd and WORKDIR
    in a temporary directory, on the CPU."""
    tmp = tmp_path_factory.mktemp("notebook")
    prefix = tmp / "jupyter"
    kernelspec.install(kernel_name=KERNEL, prefix=str(prefix))
    run_dir = tmp / "run"
    run_dir.mkdir()
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # Which Python runs the kernel (prepended here only; the file is not changed).
    nb.cells.insert(0, nbformat.v4.new_code_cell(
        "import sys; print('KERNEL_PREFIX=' + sys.prefix)", metadata={"tags": ["which"]}))
    env = {
        "JUPYTER_PATH": os.pathsep.join(
            [str(prefix / "share" / "jupyter")]
            + [p for p in os.environ.get("JUPYTER_PATH", "").split(os.pathsep) if p]),
        "MLLM_JAX_WORKDIR": str(tmp / "work"),
        "JAX_PLATFORMS": "cpu",
        # One CPU device, as on a CPU runtime; built for compile speed (compile_flags.py).
        "XLA_FLAGS": xla_flags(),
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        client = nbclient.NotebookClient(
            nb, kernel_name=KERNEL, timeout=CELL_TIMEOUT, startup_timeout=120,
            resources={"metadata": {"path": str(run_dir)}})
        start = time.perf_counter()
        client.execute()
        seconds = time.perf_counter() - start
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    print(f"notebook ran in {seconds:.1f} s")
    return nb, tmp, run_dir, seconds


def test_the_kernel_is_this_python(executed):
    nb = executed[0]
    assert f"KERNEL_PREFIX={sys.prefix}\n" in text_of(tagged(nb, "which"))


def test_the_demo_writes_into_workdir_only(executed):
    nb, tmp, run_dir, _ = executed
    assert os.path.isfile(tmp / "work" / "demo" / "model" / "config.json")
    assert os.path.isfile(tmp / "work" / "demo" / "report.md")
    assert os.listdir(run_dir) == []  # nothing in the working directory (nor installed)
    assert "same weights as stage3/final: True" in text_of(tagged(nb, "load"))


def test_chat_answers(executed):
    out = text_of(tagged(executed[0], "chat"))
    answer = next(line for line in out.splitlines() if line.startswith("A: "))
    assert answer[len("A: "):].strip(), out


def test_pytorch_logits_match(executed):
    out = text_of(tagged(executed[0], "parity"))
    line = next(line for line in out.splitlines() if "max |JAX - PyTorch| = " in line)
    assert float(line.rsplit("= ", 1)[1]) <= 1e-4, out


def test_plan_compiles_for_a_tpu_topology(executed):
    out = text_of(tagged(executed[0], "plan"))
    if importlib.util.find_spec("libtpu") is None:
        assert "libtpu is not installed" in out
        pytest.skip("libtpu is not installed")
    plans = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert plans and all(p["compiles"] is True for p in plans), out
    assert plans[0]["topology"] == "v5e:2x2" and plans[0]["devices"] == 4
