"""job.data._card_config: which of a Hub data set card's configs is read, by data.config or by default."""
import pytest

from job.data import _card_config
from job.errors import SpecError

TWO = "---\nconfigs:\n- config_name: main\n  data_files: main/*.jsonl\n- config_name: socratic\n  data_files: s/*.jsonl\n---\n"


def test_a_named_config_is_the_one_read_and_an_unknown_name_lists_those_there_are():
    assert _card_config("o/r", TWO, "socratic")["data_files"] == "s/*.jsonl"
    with pytest.raises(SpecError, match=r"has no config 'mian' \(it has: main, socratic\)"):
        _card_config("o/r", TWO, "mian")
    with pytest.raises(SpecError, match="several configs and none is the default: name one with data.config"):
        _card_config("o/r", TWO)


@pytest.mark.parametrize("card", ["", "# no header\n", "---\npretty_name: x\n---\n"])
def test_a_config_named_where_the_card_declares_none_is_refused_and_none_named_reads_the_repos_files(card):
    assert _card_config("o/r", card) is None
    with pytest.raises(SpecError, match=r"card declares no configs \('main' asked\); leave data.config out"):
        _card_config("o/r", card, "main")
