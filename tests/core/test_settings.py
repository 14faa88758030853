"""On/off switches read from the environment (``core.settings.env_flag``)."""

import pytest

from core.errors import ConfigError
from core.settings import env_flag


def test_switches_read_the_same_words_and_a_typo_names_the_variable():
    assert env_flag("STS_X", environ={}) is True
    assert env_flag("STS_X", default=False, environ={"STS_X": " "}) is False
    for raw in ("1", "true", "Yes", " ON "):
        assert env_flag("STS_X", default=False, environ={"STS_X": raw}) is True
    for raw in ("0", "False", "no", "off"):
        assert env_flag("STS_X", environ={"STS_X": raw}) is False
    with pytest.raises(ConfigError, match=r"\$STS_X='of': expected one of 1/true/yes/on or 0/false/no/off"):
        env_flag("STS_X", environ={"STS_X": "of"})
