"""The docs stay true: quoted results match docs/results.md, links resolve, the README stays short.

README.md and docs/*.md quote numbers from docs/results.md, which gallery.py writes. To find them,
this test reads results.md and the pages with one vocabulary, the one results.md itself uses:
- a metric word (FD-LeNet, accuracy, F1, SSIM, ...) announces the numbers that follow it in the same
  clause ("FD-LeNet 32.0 (34.5 without clipping)", "at 1 step 340 -> 59.9");
- a unit makes a number a measurement of its kind: "14.3 min", "0.63 s", "1.52x", "32.0 dB", "13.1%";
- in a table, a column (or a row) named by a metric word types its cells.
Numbers that set something up are skipped: "w = 3", "50 steps", "2,000 samples", "DDIM-50", "x0".
Each number found on a page must equal, to the digits it shows, a number of the same kind in the
results.md sections of the lessons that page is about (PAGES; a README table row is about the page
it links to). A number of such a kind that comes from another command is listed in OTHER_SOURCES with
that command. `test_a_wrong_number_is_caught` shows the check failing on the errors it is for.
"""
import re
from decimal import ROUND_HALF_EVEN, ROUND_HALF_UP, Decimal
from pathlib import Path

import pytest


ROOT = Path(__file__).parent.parent
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
RESULTS = ROOT / "docs" / "results.md"
PAGES_CHECKED = [p for p in DOCS if p != RESULTS]

# The lessons (results.md's first column and section titles) each page quotes; None: every lesson.
PAGES = {
    "README.md": None,
    "docs/course.md": None,
    "docs/evaluate.md": None,
    "docs/toy_2d.md": [],
    "docs/ddpm_mnist.md": ["ddpm_mnist.py", "ddpm_mnist.py course exercises", "ddpm_mnist.py --dataset cifar10"],
    "docs/fast_sampling.md": ["fast_sampling.py", "ddpm_mnist.py"],
    "docs/cfg.md": ["cfg.py"],
    "docs/classifier_guidance.md": ["classifier_guidance.py"],
    "docs/controlnet_canny.md": ["controlnet_canny.py"],
    "docs/deepcache.md": ["deepcache.py --base ddim", "deepcache.py --base rf", "rectified_flow.py --space pixel"],
    "docs/latent_diffusion.md": ["latent_diffusion.py", "ddpm_mnist.py"],
    "docs/rectified_flow.md": ["rectified_flow.py --space pixel", "rectified_flow.py --space latent",
                               "latent_diffusion.py"],
    "docs/dit_cifar.md": ["dit_cifar.py"],
    "docs/gan_mnist.md": ["gan_mnist.py against ddpm_mnist.py", "ddpm_mnist.py"],
}

# Numbers of a results kind that come from a command, not from results.md: (page, kind, number) -> command.
OTHER_SOURCES = {
    ("README.md", "s", "35"): "python toy_2d.py",
    ("docs/toy_2d.md", "s", "35"): "python toy_2d.py",
    ("README.md", "min", "76"): "results.md's summary line: the cpu profile's 9 default parts",
    ("README.md", "min", "9"): "tools/gpu_part.sh: its DEADLINE of 540 s, a budget, not a measurement",
    ("docs/ddpm_mnist.md", "s", "3"): "the speed goal: a 60,000-image epoch in 3 s, a target, not a measurement",
    ("docs/ddpm_mnist.md", "share", "11"): "python -m tools.benchmark --device cpu: 5.44 GFLOP per training image, "
                                           "x 20,000 images/s against the 989 TFLOP/s of NVIDIA's H100 datasheet",
    ("docs/toy_2d.md", "s", "30"): "python toy_2d.py (its training time)",
    **{("docs/evaluate.md", "fd", v): "python -m tools.evaluate --references --dataset mnist --data-dir ../shared/data"
       for v in ("6.6", "7.5", "78.2", "70.8", "103.6", "1270.5")},
    ("docs/evaluate.md", "share", "99.30"): "evaluate.py's first run: the LeNet's test accuracy",
    ("docs/evaluate.md", "s", "20"): "evaluate.py's first run: the LeNet's training time",
    ("docs/evaluate.md", "s", "5.9"): "python -m tools.evaluate SAMPLES.pt (10,000 images): the distance",
    ("docs/evaluate.md", "share", "90"): "evaluate.py's docstring: the ResNet-9's target accuracy",
    ("docs/ddpm_mnist.md", "min", "3"): "python ddpm_mnist.py --help (--ddpm-grid)",
    ("docs/ddpm_mnist.md", "min", "35"): "python ddpm_mnist.py --help (--ddpm-grid)",
    **{("docs/ddpm_mnist.md", "fd", v): "python -m tools.evaluate --references --dataset mnist --data-dir ../shared/data"
       for v in ("6.6", "78.2")},
    **{(page, k, v): "python -m tools.ddpm_figures --sample-only --out runs/cpu --eval 500 "
       "--sweep-steps 10 20 50 100 (run by hand, not a gallery part)" for page in ("docs/ddpm_mnist.md",)
       for k, v in [('fd', '25.6'), ('fd', '35.2'), ('fd', '37.5'), ('fd', '39.9'), ('fd', '48.9'), ('s', '30.5'), ('s', '638'), ('share', '11.8'), ('share', '12.4'), ('share', '12.8'), ('share', '13.0'), ('share', '13.4'), ('share', '5.0'), ('share', '5.2'), ('share', '5.6'), ('share', '6.0'), ('share', '6.4'), ('share', '99.35')]},
    **{("docs/ddpm_mnist.md", "fd", v): "python -m tools.gallery --profile cpu --cifar DIR --only ddpm_cifar "
       "(the calibration line of its eval.md)" for v in ("0.155", "0.132", "13.452")},
    # The architecture study and the MLP against the UNet (docs/ddpm_mnist.md names the commands), run by hand:
    **{(page, k, v): "python -m tools.ddpm_figures ... --epochs 15 --eval 500 --out runs/arch15_* "
       "(its printed lines; the network's test eps-MSE and time from the checkpoints and epoch lines)"
       for page in ("docs/ddpm_mnist.md",) for k, v in (("fd", "87.8"), ("min", "4.9"), ("mse", "0.0301"), ("share", "29.0"), ("fd", "86.8"), ("min", "6.7"),
                    ("mse", "0.0298"), ("share", "3.6"), ("share", "37.2"), ("fd", "87.5"), ("min", "7.5"),
                    ("share", "3.4"), ("share", "30.8"), ("mse", "0.0235"), ("share", "36"), ("share", "54"))},
    **{(page, k, v): "python -m tools.ddpm_figures --arch mlp ... --eval 2000 --out runs/arch_mlp, "
       "and --sample-only --eval 2000 on runs/cpu (their eval.md and test losses)"
       for page in ("docs/ddpm_mnist.md",) for k, v in (("fd", "32.8"), ("mse", "0.0254"), ("share", "12.6"), ("share", "6.5"), ("fd", "1871.0"),
                    ("mse", "0.507"), ("share", "0.0"), ("share", "100.0"))},
    **{("docs/course.md", k, v): "docs/ddpm_mnist.md's commands: the architecture study, the MLP, DDPM-1000 "
       "against DDIM (run by hand)" for k, v in (("fd", "86.8"), ("fd", "87.8"), ("mse", "0.0298"), ("mse", "0.0301"),
       ("share", "36"), ("fd", "87.5"), ("share", "54"), ("fd", "1871.0"), ("fd", "32.8"), ("mse", "0.507"),
       ("fd", "25.6"), ("fd", "37.5"), ("s", "30.5"), ("s", "638"))},
    **{("docs/cfg.md", k, v): "python cfg.py ... --cond input|xattn --out runs/cfg_input|runs/cfg_xattn, then "
       "python -m tools.cfg_sweep ... --eval 500 (tradeoff.md; run by hand, 2-core AMD EPYC)" for k, v in (
       ("diversity", "1.247"), ("diversity", "1.254"), ("fd", "103.0"), ("fd", "94.7"), ("accuracy", "0.138"),
       ("accuracy", "0.672"), ("fd", "57.6"), ("fd", "93.0"), ("accuracy", "0.218"), ("accuracy", "0.966"),
       ("diversity", "0.976"), ("diversity", "1.237"), ("fd", "21.3"), ("fd", "93.4"), ("accuracy", "0.288"),
       ("accuracy", "0.990"), ("diversity", "0.907"), ("diversity", "1.219"), ("fd", "33.1"), ("fd", "94.6"),
       ("min", "4.9"))},
    **{("docs/cfg.md", k, v): "python cfg.py ... --cond input --epochs 60 --out runs/cfg_input60, then python -m "
       "tools.cfg_sweep ... --eval 500 (tradeoff.md; run by hand, 2-core AMD EPYC)" for k, v in (
       ("accuracy", "0.094"), ("diversity", "1.183"), ("fd", "53.7"), ("accuracy", "0.848"), ("diversity", "1.081"),
       ("fd", "21.1"), ("accuracy", "0.996"), ("diversity", "0.971"), ("fd", "18.0"), ("accuracy", "1.000"),
       ("diversity", "0.934"), ("fd", "28.7"))},
    **{("docs/course.md", k, v): "docs/cfg.md's commands (input maps against cross-attention, run by hand)"
       for k, v in (("accuracy", "0.966"), ("accuracy", "0.218"), ("diversity", "1.237"), ("diversity", "0.976"),
                    ("accuracy", "0.996"))},
    **{("docs/deepcache.md", k, v): "python -m tools.deepcache_sweep --base ddim --base-ckpt runs/cpu/ckpt.pt "
       "--sweep-steps 100 ... --out runs/deepcache_100 (speed_quality.md; run by hand)" for k, v in (
       ("min", "2.5"), ("psnr", "38.4"), ("speedup", "1.60"), ("ssim", "0.9945"), ("psnr", "32.1"), ("speedup", "1.93"),
       ("ssim", "0.9868"), ("psnr", "27.9"), ("ssim", "0.9607"), ("psnr", "22.5"), ("speedup", "2.34"),
       ("ssim", "0.8892"), ("speedup", "1.13"), ("speedup", "2.17"))},
    **{("docs/latent_diffusion.md", k, v): "python -m tools.latent_figures ... --out runs/latent_cpu, then "
       "--sample-only --out runs/latent_cpu --eval 1000 (eval.md and printed lines; run by hand)" for k, v in (
       ("fd", "62.6"), ("s", "26.9"), ("share", "14.0"), ("share", "4.9"), ("fd", "49.0"), ("s", "528.9"),
       ("share", "11.5"), ("share", "7.8"), ("mse", "0.0079"))},
    **{("docs/ddpm_mnist.md", k, v): "python -m tools.ddpm_figures ... --epochs 50 --eval 2000 --schedule cosine "
       "--out runs/sched_cosine (eval.md and its test loss; run by hand)" for k, v in (
       ("mse", "0.0435"), ("fd", "37.5"), ("share", "7.0"), ("share", "16.2"))},
    # The DiT's CPU recipe on CIFAR-10 (JPEG q75), run by hand, not yet a gallery part (docs/dit_cifar.md names them):
    **{("docs/dit_cifar.md", k, v): "python -m tools.dit_figures --dataset DIR --vae-base 16 --vae-epochs 3 "
       "--model DiT-XS/2 --epochs 30 ... (its printed lines)" for k, v in (("min", "6.2"), ("s", "170"), ("s", "99"),
       ("min", "22.4"), ("s", "47"), ("min", "32"), ("mse", "0.1685"), ("mse", "0.1323"), ("min", "22"))},
    **{("docs/dit_cifar.md", k, v): "python -m tools.dit_figures --sample-only ... --eval 1000 (eval.md)"
       for k, v in (("fd", "18.61"), ("fd", "13.59"), ("fd", "13.49"), ("fd", "15.10"), ("accuracy", "0.246"),
                    ("accuracy", "0.540"), ("accuracy", "0.651"), ("accuracy", "0.685"))},
    **{(page, k, v): "tools.evaluate's first run on CIFAR-10 (JPEG q75): the CNN's training time and test accuracy"
       for page in ("docs/dit_cifar.md", "docs/evaluate.md") for k, v in (("s", "494"), ("share", "78.59"))},
    ("docs/dit_cifar.md", "accuracy", "0.786"): "tools.evaluate's first run on CIFAR-10: the CNN's test accuracy",
    **{("README.md", k, v): "docs/dit_cifar.md's commands (the DiT's CPU recipe and its --eval 1000)"
       for k, v in (("min", "28.7"), ("share", "78.6"), ("accuracy", "0.540"), ("accuracy", "0.246"))},
}

# --------------------------------------------------------------------------- reading numbers and their kinds

KINDS = {  # kind: the words that announce it, in a sentence, a column header or a row label
    "fd": r"\bFD(?:-LeNet)?\b",
    "accuracy": r"\baccuracy\b",
    "f1": r"\bF1\b",
    "precision": r"\bprecision\b",
    "recall": r"\brecall\b",
    "psnr": r"\bPSNR\b",
    "ssim": r"\bSSIM\b",
    "straightness": r"\bstraightness\b",
    "mse": r"\beps-MSE\b|\bMSE\b|\berror\b",
    "diversity": r"\bdiversity\b",
    "speedup": r"\bspeedup\b|\btheory\b",
    "min": r"\bminutes\b",
    "s": r"\bseconds\b",
}
ANY_KIND = re.compile("|".join(f"(?P<{k}>{w})" for k, w in KINDS.items()))
UNITS = {"min": r"\s?min(?:utes?)?\b", "s": r"\s?(?:s|seconds?)\b", "speedup": r"\s?×(?!\s?\d)",
         "psnr": r"\s?dB\b", "share": r"\s?%"}
SETUP = re.compile(r"(?:(?:\s*(?:,|and|or|/|to)\s*|-)[\d.,]+%?)*\s*(?:[\w()+-]+\s+)?"      # "1, 2, 4 Euler steps"
                   r"(?:steps?|samples?|images?|digits?|epochs?|class(?:es)?|calls|px|pixels?|runs?|seeds?|pairs|"
                   r"channels|levels|tokens|parameters|positions|points|latents?|features|per|times|rows?|"
                   r"columns?|cores?|threads?|bits?|GFLOP)\b")
NUMBER = re.compile(r"\d+(?:,\d{3})*(?:\.\d+)?")
CLAUSE_END = re.compile(r"[;|\n]|\.(?:\s|$)|:\s|\s—\s")


def numbers(text: str, kind: str | None):
    """(kind, number) for every measurement in `text`: unit-bearing numbers by their unit, others by `kind`."""
    for m in NUMBER.finditer(text):
        before, after = text[:m.start()], text[m.end():]
        setting = re.search(r"(?:=|\b(?:intervals?|NFE|seeds?|epochs?))\s*((?:\d+\s*(?:,|/|and|or)\s*)*)$", before)
        if setting and (not setting.group(1) or "." not in m.group()):
            continue                                   # a setting (w = 3, seeds 0 / 1 / 2), not a measurement
        if (re.search(r"(?:[A-Za-z_+./^×]|[A-Za-z]-)$", before)
                or re.match(r"[A-Za-z_/^]|[.,]\d|×\d|-[A-Za-z]|\s?[-+*/]\s?[A-Za-z(]", after)):
            continue                                   # part of a name or a formula: DDIM-50, x0, 2M, 4×8, 1 - alpha
        unit = next((u for u, pattern in UNITS.items()
                     if re.match(r"(?:-\d[\d.,]*)?" + pattern, after)), None)
        if unit:
            yield unit, m.group()
        elif kind and not SETUP.match(after):
            yield kind, m.group()


def prose_claims(text: str):
    """(kind, number) in running text: numbers with a unit, and the numbers a metric word announces."""
    yield from numbers(text, None)
    for m in ANY_KIND.finditer(text):
        rest = text[m.end():]
        stop = min([e.start() for e in (CLAUSE_END.search(rest), ANY_KIND.search(rest)) if e] + [len(rest)])
        yield from ((k, n) for k, n in numbers(rest[:stop], m.lastgroup) if k == m.lastgroup)


def kind_of(label: str) -> str | None:
    """The kind a column header or a row label names ("FD-LeNet, seeds 0 / 1 / 2"; not a long question)."""
    label = label.split(",")[0]
    m = ANY_KIND.search(label) if len(label.split()) <= 6 else None
    return m.lastgroup if m else None


def table_claims(rows: list[list[str]]):
    """(kind, number) in a markdown table: cells typed by their column's or row's metric word."""
    header, body = rows[0], rows[2:]
    columns = [kind_of(h) for h in header]
    yield from (c for h in header for c in numbers(h, None))
    for row in body:
        row_kind = kind_of(row[0])
        for i, cell in enumerate(row):
            kind = columns[i] if i < len(columns) and columns[i] else (row_kind if i else None)
            yield from numbers(cell, kind) if kind else prose_claims(cell)


def blocks(text: str):
    """(first line number, scope text, claims) per paragraph, table row or code comment of a page."""
    text = re.sub(r"```.*?```", lambda m: re.sub(r"^[^#\n]*", "", m.group(), flags=re.M), text, flags=re.S)
    text = re.sub(r"`[^`\n]*`", "CODE", text)                         # commands and flags are settings
    text = re.sub(r"\]\([^)]*\)", "]", text)                          # link targets
    text = re.sub(r"\[-?[\d.]+, -?[\d.]+\]", "RANGE", text)               # intervals: [-1, 1], U[0, 1]
    lines, i = text.split("\n"), 0
    while i < len(lines):
        if lines[i].lstrip().startswith("|"):
            j = i
            while j < len(lines) and lines[j].lstrip().startswith("|"):
                j += 1
            rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines[i:j]]
            for k, row in enumerate(rows):                         # one block per row: a README row has its scope
                if k != 1:
                    yield i + k + 1, " ".join(row), list(table_claims([rows[0], rows[1], row]) if k else
                                                         (c for h in row for c in numbers(h, None)))
            i = j
        else:
            j = i + 1
            while j < len(lines) and lines[j].strip() and not lines[j].lstrip().startswith(("|", "#", "![", "- ")):
                j += 1
            yield i + 1, "\n".join(lines[i:j]), list(prose_claims(" ".join(lines[i:j])))
            i = j


def results_values() -> dict[str, dict[str, set[str]]]:
    """lesson -> kind -> the numbers results.md gives for it (summary row and its section)."""
    values: dict[str, dict[str, set[str]]] = {}
    text = re.sub(r"`[^`\n]*`", "CODE", RESULTS.read_text())
    summary = re.search(r"^\|\s*lesson\s*\|.*?\n(?=\n)", text, flags=re.M | re.S).group()
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in summary.strip().split("\n")]
    for row in rows[2:]:
        for kind, n in table_claims([rows[0], rows[1], row]):
            values.setdefault(row[0], {}).setdefault(kind, set()).add(n)
    for m in re.finditer(r"^## (.+?) \(.*?\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S):
        for _, _, claims in blocks(m.group(2)):
            for kind, n in claims:
                values.setdefault(m.group(1), {}).setdefault(kind, set()).add(n)
    return values


def same(quoted: str, value: str) -> bool:
    """`quoted` shows `value`: equal, or `value` rounded to the two or more digits `quoted` shows (either tie rule)."""
    q, v = Decimal(quoted.replace(",", "")), Decimal(value.replace(",", ""))
    if q == v:
        return True
    e = q.as_tuple().exponent
    shown = re.sub(r"^[0.,]+", "", quoted).replace(".", "").replace(",", "")     # its significant digits
    return len(shown) >= 2 and e > v.as_tuple().exponent and q in (
        v.quantize(Decimal(1).scaleb(e), rounding) for rounding in (ROUND_HALF_UP, ROUND_HALF_EVEN))


def page_scope(page: str, line: str, values) -> list[str]:
    """The lessons a block may quote: its page's, or on a README table row the lessons of the page it links."""
    link = re.search(r"\(docs/(\w+)\.md\)", line) if page == "README.md" and line.lstrip().startswith("|") else None
    lessons = PAGES[f"docs/{link.group(1)}.md"] if link and f"docs/{link.group(1)}.md" in PAGES else PAGES[page]
    return list(values) if lessons is None else lessons


def mismatches(page: str, text: str, values) -> list[str]:
    """Every number of a results kind on the page that no results.md value of its lessons shows."""
    bad = []
    original = text.split("\n")                       # blocks() strips link targets: a README row's scope is its link
    for line, _, claims in blocks(text):
        scope = page_scope(page, original[line - 1], values)
        for kind, n in claims:
            if (page, kind, n) in OTHER_SOURCES:
                continue
            if not any(same(n, v) for lesson in scope for v in values.get(lesson, {}).get(kind, ())):
                bad.append(f"{page}:{line}: {kind} {n} is in no results.md value of {scope or 'no lesson'} "
                           f"(or name its command in OTHER_SOURCES)")
    return bad


VALUES = results_values()


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


# --------------------------------------------------------------------------- the tests


def test_results_md_is_read():
    """The reader finds every lesson of results.md and its key numbers (else every check below is empty)."""
    assert len(VALUES) >= 12, sorted(VALUES)
    assert "32.8" in VALUES["ddpm_mnist.py"]["fd"] and "344" in VALUES["rectified_flow.py --space latent"]["fd"]
    assert "38.8" in VALUES["gan_mnist.py against ddpm_mnist.py"]["s"]
    assert "15.1" in VALUES["rectified_flow.py --space pixel"]["min"]
    assert "1.73" in VALUES["deepcache.py --base ddim"]["speedup"]


@pytest.mark.parametrize("page", PAGES_CHECKED, ids=rel)
def test_quoted_results_match_results_md(page):
    assert rel(page) in PAGES, f"{rel(page)}: add it to PAGES with the lessons it quotes"
    bad = mismatches(rel(page), page.read_text(), VALUES)
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("page, wrong", [
    ("docs/rectified_flow.md", "One Euler step of the latent flow: FD-LeNet 315 → 56 after reflow."),
    ("docs/rectified_flow.md", "The pixel recipe trains in 12 min on 2 cores."),
    ("docs/gan_mnist.md", "1,000 samples in 1.6 s."),
    ("docs/cfg.md", "class accuracy 0.965 at w = 3."),
    ("README.md", "| lesson | result |\n|---|---|\n| [DDPM](docs/ddpm_mnist.md) | FD-LeNet 23.0 |"),
])
def test_a_wrong_number_is_caught(page, wrong):
    """The check fails on the disagreements it was written for (issue #27)."""
    assert mismatches(page, wrong, VALUES)


def test_every_other_source_is_quoted():
    """An OTHER_SOURCES entry whose number left its page would let a wrong number of that value pass."""
    quoted = {(rel(p), kind, n) for p in PAGES_CHECKED for _, _, claims in blocks(p.read_text())
              for kind, n in claims}
    assert not [k for k in OTHER_SOURCES if k not in quoted]


def test_a_right_number_passes():
    assert not mismatches("docs/rectified_flow.md", "FD-LeNet at 1 step 344 → 58.4 (latent; 2,000 samples).", VALUES)
    assert not mismatches("docs/gan_mnist.md", "1,000 samples in 38.8 s; FD-LeNet 37.9-43.7.", VALUES)


def anchors(page: Path) -> set[str]:
    """GitHub's anchors for the headings of a markdown page."""
    headings = re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", page.read_text(), flags=re.S), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", DOCS, ids=rel)
def test_links_and_images_exist(page):
    missing = []
    for target in re.findall(r"\]\(([^)\s]+)\)", re.sub(r"```.*?```", "", page.read_text(), flags=re.S)):
        path, _, anchor = target.partition("#")
        if re.match(r"\w+:", target):
            continue
        file = page.parent / path if path else page
        if not file.exists() or (anchor and file.suffix == ".md" and anchor not in anchors(file)):
            missing.append(target)
    assert not missing, f"{rel(page)} links to missing files or headings: {missing}"


@pytest.mark.parametrize("page", PAGES_CHECKED, ids=rel)
def test_every_figure_has_a_caption(page):
    """An image line is followed by an italic caption that names the hardware it was measured on."""
    for paragraph in re.split(r"\n\s*\n", page.read_text()):
        lines = paragraph.strip().split("\n")
        for i, line in enumerate(lines):
            if line.startswith("!["):
                caption = " ".join(lines[i + 1:])
                assert caption.startswith("*") and re.search(r"CPU|GPU", caption), \
                    f"{rel(page)}: no caption naming its hardware under {line}"


def test_readme_fits_on_a_few_screens():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 300


def test_readme_gives_the_ci_commands():
    """.ci/run runs exactly the README's set-up and test commands."""
    readme = (ROOT / "README.md").read_text()
    code = {line.split("#")[0].strip() for block in re.findall(r"```(?:bash)?\n(.*?)```", readme, flags=re.S)
            for line in block.splitlines()}
    ci = [line.split("#")[0].strip() for line in (ROOT / ".ci" / "run").read_text().splitlines() if "# README" in line]
    assert ci and all(c in code for c in ci), (ci, "must be lines of the README's code blocks")


def test_no_placeholders():
    for page in PAGES_CHECKED:
        assert not re.search(r"\b(pending|owed)\b", page.read_text(), flags=re.I), rel(page)
