"""experiments/figures: dispatcher errors, trade-off plot and RESULTS.md, shapes concepts, and the tiny smoke run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from experiments.figures import FIGURES, bias, composition, tradeoff, variations
from experiments.figures import __main__ as dispatcher
from experiments.figures import _common as C

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


class FakeScorer:
    """Cheap stand-in for CLIP: pooled pixels as image features, a seeded vector per text."""

    weights = "fake"

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(images.float(), 4).flatten(1) + 1e-3

    def text_features(self, texts) -> torch.Tensor:
        rows = [torch.randn(48, generator=torch.Generator().manual_seed(sum(map(ord, t)))) for t in texts]
        return torch.stack(rows)


def run_cli(argv, capsys):
    from ldm import cli

    code = cli.run(dispatcher.main, argv)
    return code, capsys.readouterr()


# --- one-line errors ---------------------------------------------------------------------------------------


def test_unknown_figure_is_a_one_line_error(capsys):
    code, out = run_cli(["nosuch"], capsys)
    assert code == 2
    assert out.err.strip().count("\n") == 0
    assert "unknown figure 'nosuch'" in out.err and "variations" in out.err


def test_no_arguments_prints_usage(capsys):
    code, out = run_cli([], capsys)
    assert code == 2 and "usage" in out.out


def test_composition_with_one_concept_is_a_one_line_error_before_training(capsys, tmp_path):
    code, out = run_cli(
        [
            "composition",
            "--model",
            "tiny",
            "--concept",
            "cat",
            "--runs-dir",
            str(tmp_path / "runs"),
            "--out",
            str(tmp_path / "c"),
        ],
        capsys,
    )
    assert code == 2
    assert out.err.strip().count("\n") == 0
    assert "needs 2 learned word(s)" in out.err
    assert not (tmp_path / "runs").exists()  # failed before any training


def test_all_rejects_an_option_no_figure_takes(capsys, tmp_path):
    code, out = run_cli(["all", "--model", "tiny", "--bogus", "1", "--out", str(tmp_path)], capsys)
    assert code == 2 and "--bogus" in out.err


def test_unknown_variant_and_bad_shapes_concept(tmp_path):
    with pytest.raises(C.FigureError, match="unknown variant"):
        tradeoff.pick("one-word,nope", tradeoff.variants(100))
    with pytest.raises(C.FigureError, match="shapes-<shape>"):
        C.shapes_concept("shapes-blob", tmp_path)


def test_every_figure_has_a_script():
    assert set(FIGURES) == {"variations", "text-guided", "style", "composition", "bias", "tradeoff", "downstream"}
    for name in FIGURES:
        m = __import__(FIGURES[name], fromlist=["run"])
        assert m.NAME == name and callable(m.run) and callable(m.add_arguments)


# --- pieces ------------------------------------------------------------------------------------------------


def test_variants_are_trainer_flags_of_the_paper():
    vs = tradeoff.variants(6100)
    keys = [v.key for v in vs]
    assert keys[:3] == ["one-word", "caption-short", "caption-long"]
    assert {"two-words", "three-words", "progressive", "regularised", "per-image"} <= set(keys)
    assert sum(k.startswith("lr-") for k in keys) == 2
    changes = {v.key: v.changes for v in vs}
    assert changes["progressive"] == {"vectors": 3, "progressive": 2033}
    assert {v.key: v.flags for v in vs}["progressive"] == ["--vectors", "3", "--progressive", "2033"]
    from inversion.config import TrainConfig

    base = ["--concept", "cat", "--recipe", "official", "--steps", "6100"]  # the figures run the paper's recipe
    for v in vs:  # every variant is a trainer command line that gives exactly its config
        assert TrainConfig.from_argv([*base, *v.flags]) == TrainConfig(concept="cat", recipe="official", **v.changes)


def test_plot_has_one_point_per_variant(tmp_path):
    vs = tradeoff.variants(10)
    points = [
        {"key": v.key, "label": v.label, "text_similarity": 0.2 + 0.01 * i, "image_similarity": 0.7 - 0.01 * i}
        for i, v in enumerate(vs)
    ]
    drawn = tradeoff.plot(points, tmp_path / "p.png", "t", reference=0.9)
    assert drawn == len(vs) == 10
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_results_section_is_replaced_and_keeps_other_rows(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text("# Results\n\nintro stays\n")
    p = {"label": "A", "flags": ["--vectors", "2"], "image_similarity": 0.5, "text_similarity": 0.25, "run": "r"}
    q = {**p, "label": "B", "flags": [], "caption": "cat", "run": None}
    tradeoff.update_results(path, "m/c", "m · c", "note 1", {"A": tradeoff.row(p), "B": tradeoff.row(q)}, ["A", "B"])
    tradeoff.update_results(path, "other/c", "o", "n", {"A": tradeoff.row(p)}, ["A"])
    p2 = {**p, "image_similarity": 0.75}
    tradeoff.update_results(path, "m/c", "m · c", "note 2", {"A": tradeoff.row(p2)}, ["A", "B"])
    text = path.read_text()
    assert "intro stays" in text and "note 2" in text and "note 1" not in text
    assert text.count("<!-- results:m/c -->") == 1 and text.count("<!-- results:other/c -->") == 1
    section = text.split("<!-- results:m/c -->")[1].split("<!-- /results:m/c -->")[0]
    assert "| A | `--vectors 2` | 0.7500 | 0.2500 | `r` |" in section
    assert "| B | caption: “cat” | 0.5000 | 0.2500 | — |" in section  # kept from the first write
    assert section.index("| A |") < section.index("| B |")


def test_diversity_and_colour_entropy():
    same = torch.ones(3, 4)
    assert bias.diversity(same) == pytest.approx(0.0, abs=1e-12)
    ortho = torch.eye(3)
    assert bias.diversity(ortho) == pytest.approx(1.0)
    assert bias.colour_entropy([5, 5, 5, 5]) == pytest.approx(1.0)
    assert bias.colour_entropy([8, 0, 0, 0]) == 0.0
    assert 0 < bias.colour_entropy([6, 2, 0, 0]) < 1
    with pytest.raises(C.FigureError):
        bias.diversity(torch.ones(1, 4))


def test_shapes_concept_is_colour_balanced_and_deterministic(tmp_path):
    from experiments.shapes import judge, world

    folder = C.shapes_concept("shapes-circle", tmp_path)
    files = sorted(folder.glob("*.png"))
    assert [f.stem.split("-")[1] for f in files] == list(world.COLOUR_NAMES)
    first = [f.read_bytes() for f in files]
    again = C.shapes_concept("shapes-circle", tmp_path / "again")
    assert [f.read_bytes() for f in sorted(again.glob("*.png"))] == first
    assert len(list(C.shapes_concept("shapes-star-red", tmp_path).glob("*.png"))) == 5
    if judge.JUDGE_PATH.is_file():  # the shipped judge reads the drawn colours back
        from PIL import Image

        shapes, colours = judge.score([Image.open(f) for f in files])
        assert colours.tolist() == list(range(len(world.COLOUR_NAMES)))
        assert set(shapes.tolist()) == {world.SHAPES.index("circle")}


def test_fill_and_grid():
    words = [C.Word("<a>", Path("."), None), C.Word("<b>", Path("."), None)]
    assert C.fill("S1 in the style of S2", words) == "<a> in the style of <b>"
    assert C.fill("a photo of S*", words) == "a photo of <a>"
    from PIL import Image

    ims = [Image.new("RGB", (32, 32), "red")] * 3
    g = C.grid([("row one", ims), ("two", ims[:2])], cell=40, title="t")
    assert g.size[0] >= 120 and g.size[1] > 2 * 40


# --- tiny runs ---------------------------------------------------------------------------------------------


def test_variations_and_tradeoff_subset_in_process(tmp_path):
    """Two figures on one shared tiny model with a fake scorer: files, JSON, reuse of the trained run."""
    common = ["--model", "tiny", "--runs-dir", str(tmp_path / "runs"), "--steps", "2", "--sample-steps", "2"]
    p = C.base_parser("variations", "")
    variations.add_arguments(p)
    ctx = C.Context(C.finish_args(p.parse_args(common)))
    ctx._scorer = FakeScorer()
    r1 = C.run_figure(variations, common + ["--out", str(tmp_path / "v")], ctx)
    info = json.loads((tmp_path / "v" / "variations.json").read_text())
    assert info["samples"] == 2 and info["model"] == "tiny" and info["words"][0]["token"] == "<cat>"
    assert Path(r1["png"]).is_file()
    results = tmp_path / "RESULTS.md"
    C.run_figure(
        tradeoff,
        common
        + ["--out", str(tmp_path / "t"), "--variants", "one-word,caption-short,two-words", "--results", str(results)],
        ctx,
    )
    t = json.loads((tmp_path / "t" / "tradeoff.json").read_text())
    assert [p["key"] for p in t["points"]] == ["one-word", "caption-short", "two-words"]
    assert t["plotted_points"] == 3
    assert t["points"][0]["run"] == info["words"][0]["run"]  # the one-word run was reused
    for p in t["points"]:
        assert -1 <= p["image_similarity"] <= 1 and -1 <= p["text_similarity"] <= 1
    assert "<!-- results:tiny/cat -->" in results.read_text()
    assert len(list((tmp_path / "runs").iterdir())) == 2  # cat word + cat two-words


def test_composition_of_two_runs_in_process(tmp_path):
    common = [
        "--model",
        "tiny",
        "--runs-dir",
        str(tmp_path / "runs"),
        "--steps",
        "1",
        "--sample-steps",
        "2",
        "--n",
        "1",
        "--concept",
        "cat,shapes-star-red",
        "--out",
        str(tmp_path / "c"),
    ]
    p = C.base_parser("composition", "")
    composition.add_arguments(p)
    ctx = C.Context(C.finish_args(p.parse_args(common)))
    C.run_figure(composition, common, ctx)
    info = json.loads((tmp_path / "c" / "composition.json").read_text())
    assert [w["token"] for w in info["words"]] == ["<cat>", "<shapes-star-red>"]
    assert info["filled"][0] == "a photo of <cat> next to <shapes-star-red>"


@pytest.mark.slow
def test_make_figures_tiny_smoke(tmp_path):
    """What `make figures MODEL=tiny` runs: every figure, files exist, one point per variant, JSON well-formed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    results = tmp_path / "RESULTS.md"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.figures",
            "all",
            "--model",
            "tiny",
            "--out",
            str(tmp_path),
            "--results",
            str(results),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in FIGURES:
        stem = tmp_path / name / name
        assert stem.with_suffix(".png").read_bytes()[:4] == b"\x89PNG", name
        info = json.loads(stem.with_suffix(".json").read_text())
        assert info["figure"] == name and info["model"] == "tiny" and info["smoke"] is True
    t = json.loads((tmp_path / "tradeoff" / "tradeoff.json").read_text())
    assert t["plotted_points"] == len(t["points"]) == len(tradeoff.variants(4))
    b = json.loads((tmp_path / "bias" / "bias.json").read_text())
    assert b["word"] == "circle" and b["plain"]["samples"] == b["learned"]["samples"] == 2
    section = results.read_text().split("<!-- results:tiny/cat -->")[1]
    assert section.count("\n| ") == len(tradeoff.variants(4)) + 1  # header + one row per variant
