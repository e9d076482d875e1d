"""The README documents every setting and the two commands."""

from pathlib import Path

from worker.settings import Settings

README = (Path(__file__).parent.parent / "README.md").read_text()


def test_readme_lists_every_setting() -> None:
    for name, field in Settings.model_fields.items():
        variable = field.validation_alias or f"PMQ_{name.upper()}"
        assert f"| `{variable}` |" in README, f"{variable} missing from the README"


def test_readme_shows_the_two_commands() -> None:
    assert "make dev" in README and "make test" in README
