"""experiments/results.py: each measuring script rewrites only its own section of RESULTS.md."""

from experiments import results


def test_section_is_replaced_in_place_and_others_kept(tmp_path):
    path = tmp_path / "RESULTS.md"
    begin, end = results.markers("instances-study")
    path.write_text(f"# Results\n\nbefore\n\n{begin}\nold\n{end}\n\nafter\n")
    results.write_section(path, "instances-study", "new\n")
    assert path.read_text() == f"# Results\n\nbefore\n\n{begin}\nnew\n{end}\n\nafter\n"
    assert results.read_section(path, "instances-study") == "new"
    assert results.read_section(path, "judged:shapes/ring") is None


def test_section_is_appended_and_a_missing_file_started(tmp_path):
    path = tmp_path / "RESULTS.md"
    assert results.read_section(path, "a") is None
    results.write_section(path, "a", "first")
    results.write_section(path, "results:m/c", "second")
    results.write_section(path, "a", "third")
    text = path.read_text()
    assert text.startswith(results.HEADER) and text.endswith("<!-- /results:m/c -->\n")
    assert text.count("<!-- a -->") == 1 and "first" not in text
    assert text.index("third") < text.index("second")
    assert not list(tmp_path.glob("*.tmp"))  # written through a temp file that was renamed
