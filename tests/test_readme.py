"""The README's configuration reference is the one the code generates (no key undocumented or stale)."""

from pathlib import Path

from crisp_ext.config import PickerConfig, config_reference_markdown, field_comments

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_lists_the_current_configuration():
    assert config_reference_markdown() in README.read_text(), (
        "README.md's configuration reference is out of date: paste config_reference_markdown()'s output")


def test_every_config_key_is_documented():
    notes = field_comments()
    missing = [f"{section}.{key}" for section, values in PickerConfig().to_dict().items()
               for key in values if not notes.get(section, {}).get(key)]
    assert not missing, f"config keys without a comment in crisp_ext/config.py: {missing}"
