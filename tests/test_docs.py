"""The repository documents itself: every docs/ page a file cites exists (and holds the
section it names), docs/README.md indexes every page, and nothing cites notes that live
outside the repository."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP = {".git", ".venv", "__pycache__", ".pytest_cache", ".hypothesis", "build", "dist"}
TEXT = {".py", ".md", ".cfg", ".toml", ".yaml", ".cu", ".cuh", ".h", ".cpp", ".txt"}
OUTSIDE_NOTES = ("DESIGN" + ".md", "ALGORITHMS" + ".md")  # the team's notes, not shipped
CITATION = re.compile(r'docs/([\w-]+\.md)(?:,\s*"([^"]+)")?')


def repository_texts():
    for path in sorted(ROOT.rglob("*")):
        parts = set(path.relative_to(ROOT).parts)
        if path.is_file() and path.suffix in TEXT and not parts & SKIP \
                and not any(p.endswith(".egg-info") for p in parts):
            yield path, path.read_text(errors="replace")


def test_cited_docs_pages_and_sections_exist():
    cited = 0
    for path, text in repository_texts():
        for page, section in CITATION.findall(text):
            target = ROOT / "docs" / page
            assert target.exists(), f"{path.relative_to(ROOT)} cites missing docs/{page}"
            if section:
                assert section in target.read_text(), \
                    f"{path.relative_to(ROOT)} cites '{section}' not in docs/{page}"
            cited += 1
    assert cited > 20


def test_no_file_cites_notes_outside_the_repository():
    for path, text in repository_texts():
        for name in OUTSIDE_NOTES:
            assert name not in text, f"{path.relative_to(ROOT)} cites {name}"


def test_docs_index_lists_every_page():
    index = (ROOT / "docs" / "README.md").read_text()
    pages = {p.name for p in (ROOT / "docs").glob("*.md")} - {"README.md"}
    assert pages >= {"format.md", "levels.md", "errors.md", "solver.md", "frameworks.md", "aal.md"}
    for page in pages:
        assert f"]({page})" in index, f"docs/README.md does not link {page}"
