"""The "shapes world": a procedural image-text data set small enough to learn in minutes.

A scene is 1-4 coloured shapes on a dark background, one object per cell of a coarse grid,
each small or large; an object, for CHAIR and POPE, is a colour-shape pair ("red circle").
Objects have a Zipf-like popularity and companions that co-occur with them; training captions
sometimes name an absent companion (the seed of object hallucination), which preference pairs
then teach away. Everything is a pure function of (seed, split, index).

This module gathers the public names of the modules that make the world:

    scenes        the rules (`World`), objects, scene sampling and rendering
    captions      short and detailed captions, phrases, hallucinated companions
    questions     POPE statistics and items, questions, conversations, few-shot episodes
    scoring       CHAIR and answer checking
    records       the per-scene records of the data set files
    files         `write_dataset`, `read_pairs`, the SentencePiece tokenizer
    out_of_world  real photographs
    shapes_tfds   the TFDS builder (imports tensorflow_datasets; not re-exported here)

    scenes = make_split("train", 1000, seed=0)
    paths = write_dataset("shapes_data", {"train": 1000, "val": 100}, seed=0)
    tok = load_tokenizer(paths["tokenizer"])  # mllm_jax.data.tokenizer
"""
from mllm_jax.demo.captions import (CAPTION_PROMPT, DETAIL_PROMPT, NUMBER_WORDS, box_text,
                                    count_cot, detailed_caption, hallucinated_companion,
                                    object_phrase, position_phrase, short_caption,
                                    with_article, with_extra_object)
from mllm_jax.demo.files import (IMAGE_TOKEN, SPECIAL_TOKENS, read_pairs, train_tokenizer,
                                 write_dataset)
from mllm_jax.demo.out_of_world import out_of_world_images
from mllm_jax.demo.questions import (FEWSHOT_KINDS, INSTRUCT_WEIGHTS, POPE_MODES, VQA_KINDS,
                                     Statistics, confusable_negative, conversation,
                                     existence_negative, existence_question, fewshot_episode,
                                     negatives, pope_questions, question, statistics)
from mllm_jax.demo.records import (caption_record, corpus_lines, eval_records, instruct_record,
                                   preference_record, yesno_preference_record)
from mllm_jax.demo.scenes import (CELL_NAMES, COLOURS, SHAPE_SYNONYMS, SHAPES, SIZES, SPLITS,
                                  STREAM_CAPTION, STREAM_EVAL, STREAM_FEWSHOT,
                                  STREAM_HALLUCINATION, STREAM_INSTRUCT, STREAM_PREFERENCE,
                                  STREAM_SCENE, STREAM_YESNO_PREFERENCE, Scene, ShapeObject,
                                  World, cell_edges, chair_synonyms, generate_scene, image_path,
                                  make_split, render, scene_rng, split_code)
from mllm_jax.demo.scoring import (accuracy_by_kind, answer_correct, box_iou, chair_evaluator,
                                   chair_scores, mentioned_objects, parse_box)
from mllm_jax.eval.chair import pluralize  # the world's plurals ("crosses")

__all__ = [
    # scenes
    "CELL_NAMES", "COLOURS", "SHAPE_SYNONYMS", "SHAPES", "SIZES", "SPLITS", "STREAM_CAPTION",
    "STREAM_EVAL", "STREAM_FEWSHOT", "STREAM_HALLUCINATION", "STREAM_INSTRUCT",
    "STREAM_PREFERENCE", "STREAM_SCENE", "STREAM_YESNO_PREFERENCE", "Scene", "ShapeObject",
    "World", "cell_edges", "chair_synonyms", "generate_scene", "image_path", "make_split",
    "render", "scene_rng", "split_code",
    # captions
    "CAPTION_PROMPT", "DETAIL_PROMPT", "NUMBER_WORDS", "box_text", "count_cot",
    "detailed_caption", "hallucinated_companion", "object_phrase", "pluralize",
    "position_phrase", "short_caption", "with_article", "with_extra_object",
    # questions
    "FEWSHOT_KINDS", "INSTRUCT_WEIGHTS", "POPE_MODES", "VQA_KINDS", "Statistics",
    "confusable_negative", "conversation", "existence_negative", "existence_question",
    "fewshot_episode", "negatives", "pope_questions", "question", "statistics",
    # scoring
    "accuracy_by_kind", "answer_correct", "box_iou", "chair_evaluator", "chair_scores",
    "mentioned_objects", "parse_box",
    # records
    "caption_record", "corpus_lines", "eval_records", "instruct_record", "preference_record",
    "yesno_preference_record",
    # files
    "IMAGE_TOKEN", "SPECIAL_TOKENS", "read_pairs", "train_tokenizer", "write_dataset",
    # out_of_world
    "out_of_world_images",
]
