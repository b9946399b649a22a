"""Bounce classification (common/classify.py) over a corpus of real-world replies
(tests/data/bounce_corpus.txt), and the rules file's one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.classify import DEFAULT_RULES, BadRules, BounceClass, Classifier, classify

CORPUS = Path(__file__).parent.parent / "data" / "bounce_corpus.txt"


def _cases() -> list[tuple[str, str, str]]:
    out = []
    for line in CORPUS.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        klass, dsn, reply = (part.strip() for part in line.split("|", 2))
        out.append((klass, dsn, reply))
    return out


CASES = _cases()


@pytest.mark.parametrize(("expected", "dsn", "reply"), CASES, ids=[f"{c[0]}:{c[2][:40]}" for c in CASES])
def test_corpus(expected: str, dsn: str, reply: str) -> None:
    assert classify(dsn, reply).value == expected


def test_corpus_covers_every_class_and_every_provider() -> None:
    assert {c[0] for c in CASES} == {k.value for k in BounceClass}
    text = CORPUS.read_text()
    for provider in ("Gmail", "Microsoft", "Yahoo", "Postfix", "Exim"):
        assert f"# -- {provider}" in text
    assert len(CASES) >= 60


def test_the_host_name_is_not_wording() -> None:
    # the same reply, from a host whose name says "spam" and "blocklist"
    reply = "host spam.blocklist.example[192.0.2.1]:25 said: 550 5.1.1 <a@b>: Recipient address rejected"
    assert classify("5.1.1", reply) is BounceClass.INVALID_RECIPIENT


def test_a_code_only_in_the_text_is_used() -> None:
    assert classify("", "550 5.2.2 over the top") is BounceClass.MAILBOX_FULL
    assert classify("", "something nobody wrote down") is BounceClass.OTHER


def test_first_matching_rule_wins_and_codes_and_text_combine(tmp_path: Path) -> None:
    rules = tmp_path / "r.toml"
    rules.write_text(
        '[[rule]]\nclass = "SpamContent"\ncodes = ["5.7.x"]\ntext = ["junk"]\n'
        '[[rule]]\nclass = "PolicyRelated"\ncodes = ["x.7.1"]\n'
    )
    c = Classifier.load(rules)
    assert c.classify("5.7.1", "junk mail") is BounceClass.SPAM_CONTENT
    assert c.classify("4.7.1", "junk mail") is BounceClass.POLICY_RELATED  # 4.7.1 is not 5.7.x
    assert c.classify("5.7.1", "fine mail") is BounceClass.POLICY_RELATED
    assert c.classify("5.1.1", "junk") is BounceClass.OTHER


@pytest.mark.parametrize(
    ("content", "says"),
    [
        ("", "no [[rule]] tables"),
        ("[[rule]\n", "classification rules"),
        ('[[rule]]\nclass = "Nope"\ncodes = ["5.1.1"]\n', "is not one of"),
        ('[[rule]]\nclass = "Other"\n', "give codes, text or both"),
        ('[[rule]]\nclass = "Other"\ncodes = ["5.1"]\n', "not an enhanced status code"),
        ('[[rule]]\nclass = "Other"\ntext = ["("]\n', "not a regular expression"),
        ('[[rule]]\nclass = "Other"\ntext = "x"\n', "must be a list of strings"),
        ('[[rule]]\nclass = "Other"\ntext = ["x"]\nwords = 1\n', "unknown key(s) words"),
    ],
)
def test_bad_rules_are_one_line(tmp_path: Path, content: str, says: str) -> None:
    rules = tmp_path / "r.toml"
    rules.write_text(content)
    with pytest.raises(BadRules) as e:
        Classifier.load(rules)
    assert says in str(e.value) and "\n" not in str(e.value) and str(rules) in str(e.value)


def test_missing_rules_file(tmp_path: Path) -> None:
    with pytest.raises(BadRules, match="No such file"):
        Classifier.load(tmp_path / "none.toml")


def test_shipped_rules_load() -> None:
    assert len(Classifier.load(DEFAULT_RULES).rules) > 10


def test_use_rules_switches_the_process_and_a_bad_file_stops_a_worker_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from common import classify as module
    from mtaq.cli import main

    rules = tmp_path / "mine.toml"
    rules.write_text('[[rule]]\nclass = "SpamBlock"\ntext = ["."]\n')
    try:
        module.use_rules(str(rules))
        assert classify("5.1.1", "user unknown") is BounceClass.SPAM_BLOCK
    finally:
        module._chosen.clear()
        classify.cache_clear()
    assert classify("5.1.1", "user unknown") is BounceClass.INVALID_RECIPIENT
    rules.write_text("[[rule]]\nclass = 1\n")
    assert main(["worker", "--bounce-rules", str(rules)]) == 78
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not one of" in err and str(rules) in err
    assert not module._chosen
