"""pycocoevalcap's PTB tokenization (Stanford CoreNLP 3.4.1 ``PTBLexer``) in pure Python.

pycocoevalcap 1.2's ``PTBTokenizer`` joins the captions with newlines, runs
``java edu.stanford.nlp.process.PTBTokenizer -preserveLines -lowerCase`` from
``stanford-corenlp-3.4.1.jar`` over them and drops the tokens listed in
:data:`PTB_PUNCTUATIONS`.  This module re-implements that pipeline: the rules of
CoreNLP 3.4.1's ``PTBLexer.flex`` in their order, with the scanner's semantics
(longest match with trailing context counted in its length, ties to the earlier
rule, ``%caseless`` literals but case-sensitive character classes, UTF-16 code
units), the options the command line implies (PTB3 escaping, LaTeX quotes,
split assimilations, newlines as line breaks) and Java's lower-casing.  Letters
and digits are those of the lexer's tables (Unicode 6.x); lower-casing uses
Python's tables, which differ from the JVM's only for letters that JVM's Unicode
version does not have.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from typing import Callable, List, Optional, Sequence, Tuple

try:  # the regex parser, to find the characters a rule can start with
    from re import _parser as _sre_parse
except ImportError:  # Python 3.10
    import sre_parse as _sre_parse

__all__ = ["PTB_PUNCTUATIONS", "ptb_tokenize", "ptb_tokenize_lines"]

# Removed by pycocoevalcap after tokenization.  Brackets leave the lexer as -LRB-
# etc., but -lowerCase makes them -lrb-, so they are not removed.
PTB_PUNCTUATIONS = frozenset([
    "''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
    ".", "?", "!", ",", ":", "-", "--", "...", ";",
])


def _char_class(pred) -> str:
    """The BMP characters satisfying ``pred`` as ranges for use inside ``[...]``."""
    spans: List[List[int]] = []
    for cp in range(0x10000):
        if not 0xD800 <= cp <= 0xDFFF and pred(chr(cp)):
            if spans and spans[-1][1] == cp - 1:
                spans[-1][1] = cp
            else:
                spans.append([cp, cp])
    return "".join(f"\\u{a:04x}" if a == b else f"\\u{a:04x}-\\u{b:04x}" for a, b in spans)


def _ci(spec: str) -> str:
    """A flex fragment under ``%caseless``: ASCII letters outside ``[...]`` match both cases."""
    out, in_class, i = [], False, 0
    while i < len(spec):
        c = spec[i]
        if c == "\\":
            n = 6 if spec[i + 1] == "u" else 2
            out.append(spec[i:i + n])
            i += n
            continue
        if in_class:
            in_class = c != "]"
        elif c == "[":
            in_class = True
        elif c.isascii() and c.isalpha():
            c = f"[{c.lower()}{c.upper()}]"
        out.append(c)
        i += 1
    return "".join(out)


# ----------------------------------------------------------------------------- macros
# Python's \w is letters (L*), decimal digits (Nd = \d), other numbers (No, Nl) and "_".
# CoreNLP 3.4.1's tables are Unicode 6.x: the letters and digits added since are not
# letters or digits there, and U+1885, U+1886 (letters then, marks now) still are.
_NEWER = (
    r"\u037F\u0528-\u052F\u0560\u0588\u05EF\u0860-\u086A\u0870-\u0887\u0889-\u088E\u08A1"
    r"\u08AD-\u08C9\u0978\u0980\u09FC\u0AF9\u0C34\u0C5A\u0C5D\u0C80\u0CDD\u0D04\u0D54-\u0D56"
    r"\u0D5F\u0DE6-\u0DEF\u0E86\u0E89\u0E8C\u0E8E-\u0E93\u0E98\u0EA0\u0EA8-\u0EA9\u0EAC\u13F5"
    r"\u13F8-\u13FD\u16F1-\u16F8\u170D\u171F\u1878\u191D-\u191E\u19B0-\u19C0\u19C8-\u19C9"
    r"\u1B4C\u1C80-\u1C88\u1C90-\u1CBA\u1CBD-\u1CBF\u1CF2-\u1CF3\u1CFA\u2C2F\u2C5F"
    r"\u312E-\u312F\u31BB-\u31BF\u4DB6-\u4DBF\u9FCD-\u9FFF\uA698-\uA69D\uA78F\uA794-\uA79F"
    r"\uA7AB-\uA7CA\uA7D0-\uA7D1\uA7D3\uA7D5-\uA7D9\uA7F2-\uA7F7\uA8FD-\uA8FE\uA9E0-\uA9E4"
    r"\uA9E6-\uA9FE\uAA7E-\uAA7F\uAB30-\uAB5A\uAB5C-\uAB69\uAB70-\uABBF")
_NOT_LETTER = (  # inside [...]: No, Nl and _NEWER
    _char_class(lambda c: unicodedata.category(c) in ("No", "Nl")) + _NEWER)
_LET_EXTRA = (  # LETTER's extra ranges (combining marks etc.)
    r"\u00AD\u0237-\u024F\u02C2-\u02C5\u02D2-\u02DF\u02E5-\u02FF\u0300-\u036F\u0370-\u037D"
    r"\u0384\u0385\u03CF\u03F6\u03FC-\u03FF\u0483-\u0487\u04CF\u04F6-\u04FF\u0510-\u0525"
    r"\u055A-\u055F\u0591-\u05BD\u05BF\u05C1\u05C2\u05C4\u05C5\u05C7\u0615-\u061A"
    r"\u063B-\u063F\u064B-\u065E\u0670\u06D6-\u06EF\u06FA-\u06FF\u070F\u0711\u0730-\u074F"
    r"\u0750-\u077F\u07A6-\u07B1\u07CA-\u07F5\u07FA\u0900-\u0903\u093C\u093E-\u094E"
    r"\u0951-\u0955\u0962-\u0963\u0981-\u0983\u09BC-\u09C4\u09C7\u09C8\u09CB-\u09CD\u09D7"
    r"\u09E2\u09E3\u0A01-\u0A03\u0A3C\u0A3E-\u0A4F\u0A81-\u0A83\u0ABC-\u0ACF\u0B82"
    r"\u0BBE-\u0BC2\u0BC6-\u0BC8\u0BCA-\u0BCD\u0C01-\u0C03\u0C3E-\u0C56\u0D3E-\u0D44"
    r"\u0D46-\u0D48\u0E30-\u0E3A\u0E47-\u0E4E\u0EB1-\u0EBC\u0EC8-\u0ECD")
UPPER = f"(?![{_NEWER}])[" + _char_class(str.isupper) + "]"              # [:uppercase:]
L1 = rf"(?:(?![{_NOT_LETTER}])[^\W\d_]|[\u1885\u1886])"                     # [:letter:]
D = rf"(?:(?![{_NEWER}])\d)"                                  # [:digit:] (has U+07C0-U+07C9)
LD1 = rf"(?:(?![{_NOT_LETTER}])[^\W_]|[\u1885\u1886])"           # [:letter:] | [:digit:]
SPLET = "&[aeiouAEIOU]" + _ci("(?:acute|grave|uml);")
LETTER = f"(?:{L1}|[{_LET_EXTRA}]|{SPLET})"
LETDIG = f"(?:{LD1}|[{_LET_EXTRA}]|{SPLET})"
SPACE = r"[ \t\u00A0\u2000-\u200A\u3000]"
NEWLINE = r"(?:\r\n|[\r\n\u2028\u2029\u000B\u000C\u0085])"
SPACENL = f"(?:{SPACE}|{NEWLINE})"
_NAME = r"[A-Za-z][A-Za-z0-9_:.\-]*"
SGML = (r"<(?:[!?][A-Za-z\-][^>\r\n]*"
        rf"|{_NAME}(?:[ ]+(?:{_NAME}[ ]*=[ ]*(?:'[^']*'|\"[^\"]*\")|{_NAME}))*[ ]*/?"
        rf"|/{_NAME})[ ]*>")
NUM = f"(?:{D}*(?:[.:,\\u00AD\\u066B\\u066C]{D}+)+|{D}+)"
APOS = "(?:['\\u0092\\u2019]|" + _ci("&apos;") + ")"
APOSETC = f"(?:{APOS}|[`\\u0091\\u2018\\u201B])"
WORD = f"{LETTER}{LETDIG}*(?:[.!?]{LETTER}{LETDIG}*)*"
_THING1 = f"(?:[dDoOlL]{APOSETC}{LD1})?{LD1}+"
THING = f"{_THING1}(?:[-_\\u058A\\u2010\\u2011]{_THING1})*"
AMP = _ci("&amp;")
THINGA = f"[A-Z]+(?:(?:[+&]|{AMP})[A-Z]+)+"
_ACRO_X = _ci(r"(?:Canada|Sino|Korean|EU|Japan|non)-U\.S|U\.S\.-(?:U\.K|U\.S\.S\.R)")
ACRO = f"(?:{_ACRO_X}|[A-Za-z](?:\\.[A-Za-z])*)"
ACRO2 = f"(?:{_ACRO_X}|[A-Za-z](?:\\.[A-Za-z])+)"
HTHING = f"[A-Za-z0-9][A-Za-z0-9.,\\u00AD]*(?:-(?:{ACRO2}\\.|[A-Za-z0-9\\u00AD]+))+"
REDAUX = APOS + _ci("(?:[msdMSD]|re|ve|ll)")
SREDAUX = f"[nN]{APOSETC}[tT]"
_EXT = _ci("(?:bat|bmp|class|cgi|cpp|c|dll|docx|doc|exe|gif|gz|html|htm|h|jar|java|jpeg|jpg"
           "|mov|mp3|pdf|php|pl|png|ppt|ps|py|sql|tar|txt|wav|xml|x|zip)")
FILENAME = f"(?:{LETTER}|{D})+(?:\\.(?:{LETTER}|{D})+)*\\.{_EXT}"
URLPATH = r'(?:/[^ \t\n\f\r"<>|()]+[^ \t\n\f\r"<>|.!?(){},-])?'
EMAIL_END = r'[^ \t\n\f\r"<>|(){}.\u00A0]+'
ABBREV1 = _ci(
    r"(?:Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec|Mon|Tue|Tues|Wed|Thu|Thurs|Fri"
    r"|Ala|Ariz|[A]z|[A]rk|Calif|Colo|Conn|Ct|Dak|[D]el|Fla|Ga|[I]ll|Ind|Kans?|Ky|[L]a|[M]ass"
    r"|Md|Mich|Minn|[M]iss|Mo|Mont|Neb|Nev|Okla|[O]re|[P]a|Penn|Tenn|[T]ex|Va|Vt|[W]ash|Wisc?"
    r"|Wyo|Inc|Cos?|Corp|Pp?t[ye]s?|Ltd|Plc|Rt|Bancorp|Bhd|Assn|Univ|Intl|Sys|tel|est|ext|sq"
    r"|Jr|Sr|Bros|(?:Ed|Ph)\.D|Blvd|Rd|Esq|etc|al|seq|Bldg)\.")
ABBREV4 = "(?:" + _ci(
    r"Mr|Mrs|Ms|[M]iss|Drs?|Profs?|Sens?|Reps?|Attys?|Lt|Col|Gen|Messrs|Govs?|Adm|Rev|Maj"
    r"|Sgt|Cpl|Pvt|Capt|Ste?|Ave|Pres|Lieut|Hon|Brig|Co?mdr|Pfc|Spc|Supts?|Det|Mt|Ft|Adj|Adv"
    r"|Asst|Assoc|Ens|Insp|Mlle|Mme|Msgr|Sfc|vs|Alex|Wm|Jos|Cie|a\.k\.a|cf|TREAS|Ph"
    r"|Invt|Elec|Natl|M[ft]g|Dept") + f"|{ACRO})"
ABBREV3 = _ci(r"(?:ca|figs?|prop|nos?|art|bldg|prop|pp|op)\.")
# Words after an acronym that make it sentence-final (character classes: case-sensitive).
_SENT_WORDS = "(?:" + _ci(
    r"[A]bout|[A]ccording|[A]dditionally|[A]fter|[A]n|[A]|[A]s|[A]t|[B]ut|[E]arlier|[H]e"
    r"|[H]er|[H]ere|[H]owever|[I]f|[I]n|[I]t|[L]ast|[M]any|[M]ore|[M]r\.|[M]s\.|[N]ow|[O]nce"
    r"|[O]ne|[O]ther|[O]ur|[S]he|[S]ince|[S]o|[S]ome|[S]uch|[T]hat|[T]he|[T]heir|[T]hen"
    r"|[T]here|[T]hese|[T]hey|[T]his|[W]e|[W]hen|[W]hile|[W]hat|[Y]et|[Y]ou") + "|" + SGML + ")"
_SMILE_C = r"[\-\^x=~<>']"
QUOTE_CHARS = (r"[`\u2018\u2019\u201A\u201B\u201C\u201D\u0091-\u0094\u201E\u201F\u2039\u203A"
               r"\u00AB\u00BB]")
MISCSYMBOL = (
    r"[+%&~\^|\\\u00A6\u00A7\u00A8\u00A9\u00AC\u00AE\u00AF\u00B0-\u00BA\u00D7\u00F7\u0387"
    r"\u05BE\u05C0\u05C3\u05C6\u05F3\u05F4\u0600-\u0603\u0606-\u060A\u060C\u0614\u061B\u061E"
    r"\u066A\u066D\u0703-\u070D\u07F6-\u07F8\u0964\u0965\u0E4F\u1FBD\u2016\u2017\u2020-\u2023"
    r"\u2030-\u2038\u203B\u203E-\u2042\u2044\u207A-\u207F\u208A-\u208E\u2100-\u214F"
    r"\u2190-\u21FF\u2200-\u2BFF\u3012\u30FB\uFF01-\uFF0F\uFF1A-\uFF20\uFF3B-\uFF40\uFF5B-\uFF65]")


# ----------------------------------------------------------------------------- actions
def _soft(t: str) -> str:  # removeSoftHyphens
    return (t.replace("\u00AD", "") or "-") if "\u00AD" in t else t


_LEFT_QUOTES = [(re.compile(a), b) for a, b in (
    ("&apos;|'", "`"), ('"|&quot;', "``"), ("[\u0091\u2018\u201B\u2039]", "`"),
    ("[\u0092\u2019\u203A]", "'"), ("[\u0093\u201C\u00AB]", "``"), ("[\u0094\u201D\u00BB]", "''"))]
_RIGHT_QUOTES = [(re.compile("&apos;|'"), "'"), (re.compile('"|&quot;'), "''")] + _LEFT_QUOTES[2:]


def _quotes(table):  # handleQuotes with latexQuotes
    def act(t: str) -> str:
        for rx, rep in table:
            t = rx.sub(rep, t)
        return t
    return act


def _replace(table):
    def act(t: str) -> str:
        for a, b in table:
            t = t.replace(a, b)
        return t
    return act


_BRACKETS = _replace([("(", "-LRB-"), (")", "-RRB-")])
_AMP = re.compile("(?i:&amp;)")


def _keep(t: str) -> str:
    return t


# ----------------------------------------------------------------------------- rules
_NL = "*NL*"  # PTBLexer.NEWLINE_TOKEN
_Action = Callable[[str], str]
# PTBLexer.flex's rules in order: (alternatives, trailing context or None,
# action(matched text) -> token or None (skipped), characters pushed back to be scanned again).
_RULE_SPECS: List[Tuple[List[str], Optional[str], Optional[_Action], int]] = [
    ([_ci(r"c[+][+]")], None, _keep, 0),
    ([_ci("(?:c|f)#")], None, _keep, 0),
    ([_ci("cannot")], None, lambda t: t[:3], 3),
    ([_ci("'twas")], None, lambda t: t[:2], 3),
    ([_ci("'tis")], None, lambda t: t[:2], 2),
    ([_ci("gonna|gotta|lemme|gimme|wanna")], None, lambda t: t[:3], 2),
    ([SGML], None, lambda t: t.replace(" ", "\u00A0"), 0),
    ([_ci("&(?:MD|mdash|ndash);") + "|[\u0096\u0097\u2013\u2014\u2015]"], None,
     lambda t: "--", 0),
    ([AMP], None, lambda t: "&", 0),
    ([_ci("&(?:HT|TL|UR|LR|QC|QL|QR|odq|cdq|#[0-9]+);")], None, _keep, 0),
    ([WORD], REDAUX, _soft, 0),
    ([r"[A-Za-z\u00AD]*[A-MO-Za-mo-z]\u00AD*"], SREDAUX, _soft, 0),
    ([WORD], None, _soft, 0),
    ([f"{APOS}[nN]{APOS}?", f"[lLdDjJ]{APOS}", _ci("Dunkin") + APOS, _ci("somethin") + APOS,
      _ci("ol") + APOS, APOS + _ci("em"), f"[A-HJ-XZn]{APOSETC}{L1}{L1}+",
      f"{APOS}[2-9]0[sS]", APOS + _ci("till?"), f"{L1}+[aeiouyAEIOUY]{APOSETC}[aeiouA-Z]{L1}*",
      APOS + _ci("cause"), _ci(r"cont'd\.?"), _ci("'twas"), _ci("nor'easter"), _ci("c'mon"),
      _ci("e'er"), _ci("s'mores"), _ci("ev'ry"), _ci("li'l"), _ci("nat'l"),
      f"[oO]{APOSETC}[oO]"], None, _keep, 0),
    ([f"[yY]{APOS}"], L1, _keep, 0),
    ([_ci("https?") + r'://[^ \t\n\f\r"<>|(){}]+[^ \t\n\f\r"<>|.!?(){},-]'], None, _keep, 0),
    ([_ci("www") + r'\.(?:[^ \t\n\f\r"<>|.!?(){},]+\.)+[a-zA-Z]{2,4}' + URLPATH,
      r'(?:[^ \t\n\f\r"`' + "'" + r'<>|.!?(){},-_$]+\.)+' + _ci("(?:com|net|org|edu)") + URLPATH],
     None, _keep, 0),
    ([f"(?:{_ci('&lt;')}|<)?[a-zA-Z0-9]" + r'[^ \t\n\f\r"<>|()\u00A0{}]*@'
      + f"(?:{EMAIL_END}\\.)*{EMAIL_END}(?:{_ci('&gt;')}|>)?"], None, _keep, 0),
    (["@[a-zA-Z_][a-zA-Z_0-9]*", f"#{LETTER}+"], None, _keep, 0),
    ([REDAUX], "[^A-Za-z]", _quotes(_RIGHT_QUOTES), 0),
    ([SREDAUX], "[^A-Za-z]", _quotes(_RIGHT_QUOTES), 0),
    ([f"{D}{{1,2}}[-/]{D}{{1,2}}[-/]{D}{{2,4}}"], None, _keep, 0),
    ([f"[-+]?{NUM}"], None, _soft, 0),
    ([r"[\u207A\u207B\u208A\u208B]?(?:[\u2070\u00B9\u00B2\u00B3\u2074-\u2079]+|[\u2080-\u2089]+)"],
     None, _keep, 0),
    # FRAC (FRACSTB3 belongs to the strictTreebank3 state, which is not used)
    ([f"(?:{D}{{1,4}}[- \\u00A0])?{D}{{1,4}}(?:\\\\?/|\\u2044){D}{{1,4}}"], None,
     lambda t: t.replace(" ", "\u00A0"), 0),
    ([r"[\u00BC\u00BD\u00BE\u2153-\u215E]"], None, _replace(
        [("\u00BC", "1/4"), ("\u00BD", "1/2"), ("\u00BE", "3/4"), ("\u2153", "1/3"),
         ("\u2154", "2/3")]), 0),
    ([_ci("-(?:RRB|LRB|RCB|LCB|RSB|LSB)-"), _ci(r"C\.D\.s"), _ci("pro-"), _ci("anti-"),
      _ci("S(?:&|&amp;)P-500"), _ci("S(?:&|&amp;)Ls"), _ci("Cap") + APOS + "[nN]",
      "[cC]" + APOS + _ci("est")], None, lambda t: _AMP.sub("&", t), 0),
    ([r"[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}(?:\\?/[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}){1,2}"], None,
     _keep, 0),
    ([r"[A-Z]*\$|#"], None, _keep, 0),
    ([r"[\u00A2\u00A3\u00A4\u00A5\u0080\u20A0\u20AC\u060B\u0E3F\u20A4\uFFE0\uFFE1\uFFE5\uFFE6]"],
     None, _replace([("\u00A2", "cents"), ("\u00A3", "#"), ("\u00A4", "$"), ("\u0080", "$"),
                     ("\u20A0", "$"), ("\u20AC", "$")]), 0),
    # An acronym before a sentence-initial word: the period is returned again ("I." -> "I" ".").
    ([ACRO + r"\."], f"{SPACENL}+{_SENT_WORDS}{SPACENL}", lambda t: t[0] if len(t) == 2 else t, 1),
    ([ABBREV3], f"{SPACENL}?{D}", _keep, 0),
    ([_ci(r"(?:pt[eyEY]|co)\.")], SPACE + _ci("(?:ltd|lim)"), _keep, 0),
    ([ABBREV1], f"{SPACENL}(?:{SPACENL}|{UPPER}|{SGML})", _keep, 1),
    ([ABBREV1], "[\\s\\S]{2}", _keep, 0),
    ([ABBREV1], None, _keep, 1),
    ([ABBREV4 + r"\."], None, _keep, 0),
    ([ABBREV4], SPACE, _keep, 0),
    ([ACRO], SPACENL, _keep, 0),
    ([APOS + "[0-9][0-9]"], SPACENL, _keep, 0),
    ([FILENAME], f"(?:{SPACENL}|[.?!,])", _keep, 0),
    ([WORD + r"\."], r"[,;:\u3001]", _soft, 0),
    ([r"(?:\([0-9]{2,3}\)[ \u00A0]?|(?:\+\+?)?(?:[0-9]{2,4}[\- \u00A0])?[0-9]{2,4}[\- \u00A0])"
      r"[0-9]{3,4}[\- \u00A0]?[0-9]{3,5}",
      r"(?:(?:\+\+?)?[0-9]{2,4}\.)?[0-9]{2,4}\.[0-9]{3,4}\.[0-9]{3,5}"], None,
     lambda t: _BRACKETS(t.replace(" ", "\u00A0")), 0),
    (['"|' + _ci("&quot;")], "[A-Za-z0-9$]", _quotes(_LEFT_QUOTES), 0),
    (['"|' + _ci("&quot;")], None, _quotes(_RIGHT_QUOTES), 0),
    (["\x7f"], None, None, 0),
    (["<|" + _ci("&lt;")], None, lambda t: "<", 0),
    ([">|" + _ci("&gt;")], None, lambda t: ">", 0),
    ([r"[<>]?[:;=][\-o*']?[()DPdpO\\{@|\[\]]"], "[^A-Za-z0-9]", _BRACKETS, 0),
    ([r"[\^x=~<>]\.\[\^[xX]=~<>\]", f"{_SMILE_C}_{_SMILE_C}", rf"\({_SMILE_C}[_.]?{_SMILE_C}\)",
      r"\([\^x=~<>']-[\^x=~<>'`]\)"], None, _BRACKETS, 0),
    ([r"\{"], None, lambda t: "-LCB-", 0),
    ([r"\}"], None, lambda t: "-RCB-", 0),
    ([r"\["], None, lambda t: "-LSB-", 0),
    ([r"\]"], None, lambda t: "-RSB-", 0),
    ([r"\("], None, lambda t: "-LRB-", 0),
    ([r"\)"], None, lambda t: "-RRB-", 0),
    ([r"-+"], None, lambda t: "--" if 3 <= len(t) <= 4 else t, 0),
    ([r"\.{3,5}", r"(?:\.[ \u00A0]){2,4}\.", r"[\u0085\u2026]"], None, lambda t: "...", 0),
    (["@+", "#+", "_+"], None, _keep, 0),
    ([r"\*+", r"(?:\\\*){1,3}"], None, _keep, 0),
    ([r"[,;:\u3001]"], None, _keep, 0),
    ([r"[?!]+"], None, _keep, 0),
    ([r"[.\u00A1\u00BF\u037E\u0589\u061F\u06D4\u0700-\u0702\u07FA\u3002]"], None, _keep, 0),
    (["="], None, _keep, 0),
    (["/"], None, _keep, 0),
    ([HTHING + r"\."], r"[,;:\u3001]", _soft, 0),
    ([HTHING], None, _soft, 0),
    ([THING + r"\."], r"[,;:\u3001]", _keep, 0),
    ([THING], None, _keep, 0),
    ([THINGA + r"\."], r"[,;:\u3001]", lambda t: _AMP.sub("&", t), 0),
    ([THINGA], None, lambda t: _AMP.sub("&", t), 0),
    (["'"], r"[A-Za-z][^ \t\n\r\u00A0]", _quotes(_LEFT_QUOTES), 0),
    ([REDAUX], None, _quotes(_RIGHT_QUOTES), 0),
    ([SREDAUX], None, _quotes(_RIGHT_QUOTES), 0),
    ([APOS, "''", QUOTE_CHARS + "{1,2}"], None, _quotes(_RIGHT_QUOTES), 0),
    (["<<|>>"], None, _keep, 0),
    ([MISCSYMBOL], None, _keep, 0),
    ([f"\\x00|{SPACE}+|[\\u200B\\u200E\\u200F\\uFEFF]"], None, None, 0),
    ([NEWLINE], None, lambda t: _NL, 0),
    ([_ci("&nbsp;")], None, None, 0),
    (["[^\n]"], None, None, 0),  # untokenizable: deleted
]


_CATEGORY = {"CATEGORY_DIGIT": r"\d", "CATEGORY_NOT_DIGIT": r"\D", "CATEGORY_WORD": r"\w",
             "CATEGORY_NOT_WORD": r"\W", "CATEGORY_SPACE": r"\s", "CATEGORY_NOT_SPACE": r"\S"}


def _first(items) -> Tuple[List[str], bool]:
    """Classes of the characters a parsed regex can start with, and whether it can be empty."""
    out: List[str] = []
    for op, av in items:
        op = op.name
        if op == "LITERAL":
            out.append(re.escape(chr(av)))
            return out, False
        if op == "NOT_LITERAL":
            out.append("[^" + re.escape(chr(av)) + "]")
            return out, False
        if op == "IN":
            neg = "^" if av and av[0][0].name == "NEGATE" else ""
            body = "".join(re.escape(chr(x)) if o.name == "LITERAL" else
                           f"{re.escape(chr(x[0]))}-{re.escape(chr(x[1]))}" if o.name == "RANGE"
                           else _CATEGORY[x.name] for o, x in av[1 if neg else 0:])
            out.append(f"[{neg}{body}]")
            return out, False
        if op in ("ASSERT", "ASSERT_NOT", "AT"):
            continue
        if op == "SUBPATTERN":
            branches, empty = [av[3]], False
        elif op == "BRANCH":
            branches, empty = av[1], False
        elif op in ("MAX_REPEAT", "MIN_REPEAT"):
            branches, empty = [av[2]], av[0] == 0
        else:
            raise ValueError(op)
        for b in branches:
            first, b_empty = _first(b)
            out += first
            empty = empty or b_empty
        if not empty:
            return out, False
    return out, True


def _first_chars(pattern: str):
    """A regex matching the characters ``pattern`` can start with (None: any character)."""
    try:
        first, empty = _first(_sre_parse.parse(pattern))
        return None if empty else re.compile("|".join(first))
    except Exception:  # a construct _first does not know: try the rule everywhere
        return None


@functools.lru_cache(maxsize=None)
def _alternatives():
    """Every rule alternative as (rule index, regex, has trailing context, first characters)."""
    return [(i, re.compile(f"(?:{p})" + (f"(?=({tc}))" if tc else "")), tc is not None,
             _first_chars(p)) for i, (patterns, tc, _, _) in enumerate(_RULE_SPECS)
            for p in patterns]


@functools.lru_cache(maxsize=None)
def _candidates(c: str):
    """The alternatives that can match at a position holding ``c``."""
    return [(i, rx, has_tc) for i, rx, has_tc, first in _alternatives()
            if first is None or first.match(c)]


# Shortcuts for the common cases, giving what the rules give there: a run of spaces and
# tabs (no other rule starts with them); a line break \n, \r, \r\n or \f (likewise); ASCII
# letters before a blank, the end, a bracket, a quote, or , ; : ! ? and a blank (WORD, or
# an assimilation); ASCII letters but no abbreviation before a period and a blank; , ; :
# a run of ? and ! or a period, before a blank.
_SPACES = re.compile(r"[ \t\u00A0\u2000-\u200A\u3000]+")
_BLANK = r"(?:[ \t\n\r\f]|\Z)"
_PLAIN_WORD = re.compile(rf"[A-Za-z]+(?=[\"()<>{{}}|]|[,;:!?]*{_BLANK})")
_WORD_PERIOD = re.compile(rf"([A-Za-z]+)\.(?={_BLANK})")
_ABBREV = re.compile(f"{ABBREV1}|{ABBREV4}\\.|{ABBREV3}|" + _ci(r"(?:pt[eyEY]|co)\."))
_PUNCT = re.compile(rf"(?:[,;:]|[?!]+|\.(?![ \u00A0]\.))(?={_BLANK})")
_ASSIMILATIONS = frozenset(["cannot", "gonna", "gotta", "lemme", "gimme", "wanna"])


def _lex(s: str) -> List[str]:
    """PTBLexer's tokens of ``s`` (a UTF-16 code-unit string); line breaks are ``*NL*``."""
    out: List[str] = []
    pos, n = 0, len(s)
    while pos < n:
        c = s[pos]
        if c == " " or c == "\t":
            pos = _SPACES.match(s, pos).end()
            continue
        if c == "\n" or c == "\r" or c == "\f":
            out.append(_NL)
            pos += 2 if s.startswith("\r\n", pos) else 1
            continue
        m = _PLAIN_WORD.match(s, pos) or _WORD_PERIOD.match(s, pos)
        if m is not None and (m.lastindex is None or not _ABBREV.fullmatch(s, pos, m.end())):
            word = s[pos:m.end(m.lastindex or 0)]
            if word.lower() in _ASSIMILATIONS:
                word = word[:3]
            out.append(word)
            pos += len(word)
            continue
        m = _PUNCT.match(s, pos)
        if m is not None:
            out.append(m.group())
            pos = m.end()
            continue
        best_len = 0
        for i, rx, has_tc in _candidates(c):
            m = rx.match(s, pos)
            if m is not None:
                end = m.end()
                total = end - pos + (len(m.group(1)) if has_tc else 0)
                if total > best_len:  # the longest; on a tie, the earlier rule
                    best_len, best, best_end = total, i, end
        text = s[pos:best_end]
        _, _, act, back = _RULE_SPECS[best]
        if act is not None:
            out.append(act(text))
        pos = best_end - back
    return out


_ASTRAL = re.compile("[\U00010000-\U0010FFFF]")
_PAIR = re.compile("[\ud800-\udbff][\udc00-\udfff]")
_LONE = re.compile("[\ud800-\udfff]")


def _to_utf16(s: str) -> str:
    def split(m):
        cp = ord(m.group()) - 0x10000
        return chr(0xD800 + (cp >> 10)) + chr(0xDC00 + (cp & 0x3FF))
    return _ASTRAL.sub(split, s)


def _from_utf16(t: str) -> str:
    t = _PAIR.sub(lambda m: chr(0x10000 + ((ord(m.group()[0]) - 0xD800) << 10)
                                + ord(m.group()[1]) - 0xDC00), t)
    return _LONE.sub("?", t)  # Java's UTF-8 encoder writes '?' for an unpaired surrogate


def ptb_tokenize_lines(captions: Sequence[str]) -> List[str]:
    """pycocoevalcap's ``PTBTokenizer`` over ``captions``: one space-joined string each.

    As pycocoevalcap does, newlines in a caption become spaces and the captions
    are tokenized as one text, one caption per line; so the last token of a
    caption can depend on the start of the next one (``vitamin C.`` keeps its
    period unless the next caption starts with ``A``, ``The``, ...).  The other
    line breaks CoreNLP knows (``\\r``, ``\\x0b``, ``\\x0c``, U+2028, U+2029)
    split a caption in two and shift the following captions, as in
    pycocoevalcap; captions left without a line get ``""``.
    """
    text = "\n".join(c.replace("\n", " ") for c in captions)
    astral = _ASTRAL.search(text) is not None
    parts: List[str] = []
    begin = True
    for tok in _lex(_to_utf16(text) if astral else text):
        if tok == _NL:
            parts.append("\n")
            begin = True
            continue
        if not begin:
            parts.append(" ")
        begin = False
        parts.append((_from_utf16(tok) if astral else tok).lower())
    lines = "".join(parts).split("\n")[:len(captions)]
    lines += [""] * (len(captions) - len(lines))
    return [" ".join(w for w in line.rstrip().split(" ") if w not in PTB_PUNCTUATIONS)
            for line in lines]


def ptb_tokenize(text: str) -> str:
    """One caption as pycocoevalcap's ``PTBTokenizer`` tokenizes it alone.

    CoreNLP 3.4.1 ``PTBTokenizer -preserveLines -lowerCase``, then removal of
    :data:`PTB_PUNCTUATIONS`; the tokens are joined with single spaces.
    """
    return ptb_tokenize_lines([text])[0]
