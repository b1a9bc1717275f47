"""The official VQAv2 answer normalisation and accuracy (GT-Vision-Lab/VQA ``vqaEval.py``), so that
scores here are comparable with published ones.

Its quirks are kept on purpose: apostrophes and colons are not punctuation; a period is dropped
unless a digit follows it; when the text has a digit-comma-digit (``1,000``) or a punctuation mark
next to a space, that mark is deleted, otherwise replaced by a space; the contraction map runs after
lower-casing (so its capitalised keys never match); reference answers get only the punctuation step,
and only when they are not all the same (VQAv2 stores them normalised already)."""
from __future__ import annotations

import re

_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")
# The official pattern is "(?!<=\d)(\.)(?!\d)": its first group is a lookahead, not a lookbehind,
# so only "followed by a digit" protects a period.
_PERIOD = re.compile(r"\.(?!\d)")
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
# spelling -> contraction, as in the official table (including its odd entries)
_CONTRACTIONS = dict(line.split() for line in """
aint ain't
arent aren't
cant can't
couldve could've
couldnt couldn't
couldn'tve couldn't've
couldnt've couldn't've
didnt didn't
doesnt doesn't
dont don't
hadnt hadn't
hadnt've hadn't've
hadn'tve hadn't've
hasnt hasn't
havent haven't
hed he'd
hed've he'd've
he'dve he'd've
hes he's
howd how'd
howll how'll
hows how's
Id've I'd've
I'dve I'd've
Im I'm
Ive I've
isnt isn't
itd it'd
itd've it'd've
it'dve it'd've
itll it'll
let's let's
maam ma'am
mightnt mightn't
mightnt've mightn't've
mightn'tve mightn't've
mightve might've
mustnt mustn't
mustve must've
neednt needn't
notve not've
oclock o'clock
oughtnt oughtn't
ow's'at 'ow's'at
'ows'at 'ow's'at
'ow'sat 'ow's'at
shant shan't
shed've she'd've
she'dve she'd've
she's she's
shouldve should've
shouldnt shouldn't
shouldnt've shouldn't've
shouldn'tve shouldn't've
somebody'd somebodyd
somebodyd've somebody'd've
somebody'dve somebody'd've
somebodyll somebody'll
somebodys somebody's
someoned someone'd
someoned've someone'd've
someone'dve someone'd've
someonell someone'll
someones someone's
somethingd something'd
somethingd've something'd've
something'dve something'd've
somethingll something'll
thats that's
thered there'd
thered've there'd've
there'dve there'd've
therere there're
theres there's
theyd they'd
theyd've they'd've
they'dve they'd've
theyll they'll
theyre they're
theyve they've
twas 'twas
wasnt wasn't
wed've we'd've
we'dve we'd've
weve we've
werent weren't
whatll what'll
whatre what're
whats what's
whatve what've
whens when's
whered where'd
wheres where's
whereve where've
whod who'd
whod've who'd've
who'dve who'd've
wholl who'll
whos who's
whove who've
whyll why'll
whyre why're
whys why's
wont won't
wouldve would've
wouldnt wouldn't
wouldnt've wouldn't've
wouldn'tve wouldn't've
yall y'all
yall'll y'all'll
y'allll y'all'll
yall'd've y'all'd've
y'alld've y'all'd've
y'all'dve y'all'd've
youd you'd
youd've you'd've
you'dve you'd've
youll you'll
youre you're
youve you've
""".split("\n") if line)


def strip_punctuation(text: str) -> str:
    """The official punctuation step (the decision to delete or space a mark reads the input text)."""
    out = text
    delete_all = _DIGIT_COMMA.search(text) is not None
    for p in _PUNCT:
        out = out.replace(p, "" if delete_all or p + " " in text or " " + p in text else " ")
    return _PERIOD.sub("", out)


def normalize_answer(text: str) -> str:
    """A predicted answer as the official script compares it: punctuation, lower case, number
    words to digits, no articles, contractions restored."""
    text = strip_punctuation(text.replace("\n", " ").replace("\t", " ").strip())
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_accuracy(pred: str, answers) -> float:
    """Official VQA accuracy, for any number of reference answers.

    VQAv2 has 10 references per question: for each of the 10 leave-one-out subsets of 9, the
    prediction scores min(1, matches / 3) — full credit when 3 of the other annotators gave it — and
    the score is the mean over the subsets (1 of 10 matching gives 0.3, 3 of 10 give 0.9). For n
    references we take the n leave-one-out subsets of n - 1 the same way, with full credit at
    min(3, n - 1) matches: three agreeing annotators where a subset has three, else all of them.
    So n = 10 is exactly the official score, [a, a] scores a prediction a 1.0 (the official
    threshold of 3 would cap two agreeing references at 0.33), and [a, b] scores a 0.5. With one
    reference (GQA, POPE, easy-VQA) there is no subset to leave one out of: it is an exact match of
    both normalised answers."""
    p = normalize_answer(pred)
    answers = [str(a) for a in answers]
    if len(answers) <= 1:
        return float(bool(answers) and p == normalize_answer(answers[0]))
    refs = [strip_punctuation(a) for a in answers] if len(set(answers)) > 1 else answers
    hits = [r == p for r in refs]
    total = sum(hits)
    full = min(3, len(refs) - 1)  # matches among the others that earn full credit
    return sum(min(1.0, (total - h) / full) for h in hits) / len(refs)
