"""The user config (tunedeck.core.paths): typed, checked in one place, and edited in place
so that what a user wrote in it survives tunedeck's writes."""

from __future__ import annotations

import pytest

from tunedeck.core.errors import UserError
from tunedeck.core.paths import (
    UserConfig, add_recent_project, config_file, load_user_config, save_user_config, update_user_config, user_config,
)

WRITTEN = """\
# my tunedeck settings
theme = "tunedeck-dark"  # easier on the eyes

# folders with models of mine
model_dirs = ["~/models"]

[keymap]
# train with F5
"screen.train" = "f5"
"""


def write(text: str) -> None:
    config_file().parent.mkdir(parents=True, exist_ok=True)
    config_file().write_text(text, encoding="utf-8")


def test_no_file_reads_as_defaults():
    assert load_user_config() == {}
    assert user_config() == UserConfig()


def test_comments_and_key_order_survive_an_update():
    write(WRITTEN)
    update_user_config(theme="tunedeck-light")
    text = config_file().read_text(encoding="utf-8")
    for kept in ("# my tunedeck settings", "# easier on the eyes", "# folders with models of mine",
                 "# train with F5", 'model_dirs = ["~/models"]', '"screen.train" = "f5"'):
        assert kept in text
    assert 'theme = "tunedeck-light"' in text
    assert text.index("theme") < text.index("model_dirs") < text.index("[keymap]")
    assert user_config().theme == "tunedeck-light"


def test_comments_survive_recent_projects_chat_settings_and_a_save(tmp_path):
    from tunedeck.core.chat import GenSettings, save_settings, saved_settings

    write(WRITTEN)
    add_recent_project(tmp_path / "a.toml")
    add_recent_project(tmp_path / "b.toml")
    add_recent_project(tmp_path / "a.toml")
    save_settings(tmp_path / "a.toml", GenSettings(temperature=0.3))
    assert user_config().recent_projects == [str(tmp_path / "a.toml"), str(tmp_path / "b.toml")]
    assert saved_settings(tmp_path / "a.toml").temperature == 0.3
    save_user_config({**load_user_config(), "model_dirs": ["~/more"]})
    text = config_file().read_text(encoding="utf-8")
    assert "# easier on the eyes" in text and "# train with F5" in text
    assert user_config().model_dirs == ["~/more"]


def test_a_save_removes_the_keys_it_leaves_out():
    write(WRITTEN)
    save_user_config({"theme": "tunedeck-dark"})
    assert load_user_config() == {"theme": "tunedeck-dark"}
    assert "# easier on the eyes" in config_file().read_text(encoding="utf-8")


def test_recent_projects_are_capped(tmp_path):
    for n in range(12):
        add_recent_project(tmp_path / f"{n}.toml", limit=10)
    recent = user_config().recent_projects
    assert len(recent) == 10 and recent[0] == str(tmp_path / "11.toml")


@pytest.mark.parametrize("text", ["theme = \n", "theme = 'a'\ntheme = 'b'\n", "[keymap\n"])
def test_a_broken_file_reads_as_defaults_and_is_not_written_over(text):
    write(text)
    assert load_user_config() == {} and user_config() == UserConfig()
    with pytest.raises(UserError, match="config.toml: not a valid TOML file .*fix it"):
        update_user_config(theme="tunedeck-light")
    with pytest.raises(UserError):
        add_recent_project(config_file().parent / "p.toml")
    assert config_file().read_text(encoding="utf-8") == text


def test_a_file_that_is_not_utf8_reads_as_defaults_and_is_kept():
    config_file().parent.mkdir(parents=True, exist_ok=True)
    config_file().write_bytes(b'theme = "\xff"\n')
    assert user_config() == UserConfig()
    with pytest.raises(UserError, match="not UTF-8"):
        update_user_config(theme="x")
    assert config_file().read_bytes() == b'theme = "\xff"\n'


def test_values_of_the_wrong_type_read_as_defaults():
    write('theme = 3\nrecent_projects = ["/a.toml", 4, "/b.toml"]\nmodel_dirs = "~/models"\n'
          'other = "kept"\n[keymap]\n"screen.train" = 5\n[chat_settings]\n"/p.toml" = 1\n"/q.toml" = {top_k = 5}\n')
    config = user_config()
    assert config == UserConfig(recent_projects=["/a.toml", "/b.toml"], chat_settings={"/q.toml": {"top_k": 5}})
    assert load_user_config() == {"recent_projects": ["/a.toml", "/b.toml"], "other": "kept",
                                  "chat_settings": {"/q.toml": {"top_k": 5}}}


def test_a_value_of_another_type_is_rewritten():
    write("theme = 1  # a number by mistake\n")
    update_user_config(theme="tunedeck-dark")
    assert user_config().theme == "tunedeck-dark"
    write("[keymap]\n\"screen.train\" = \"f5\"\n")
    update_user_config(keymap={"screen.train": "f6", "screen.chat": "f7"})
    assert user_config().keymap == {"screen.train": "f6", "screen.chat": "f7"}
