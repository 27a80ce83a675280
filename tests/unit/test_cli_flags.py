"""``fxqat train`` and ``fxqat autobits`` share their common flags through one argparse parent."""

import argparse

import fxqat.cli as cli


def _subs(*names: str):
    action = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return [action.choices[n] for n in names]


def _flags(p: argparse.ArgumentParser):
    return {o: a for a in p._actions for o in a.option_strings if o.startswith("--") and o != "--help"}


def test_shared_flags_have_one_definition_and_one_help_text():
    train, auto = map(_flags, _subs("train", "autobits"))
    shared = sorted(set(train) & set(auto))
    assert len(shared) >= 19 and {"--model", "--fp-lr", "--lr", "--steps", "--hybrid", "--out"} <= set(shared)
    for flag in shared:
        if flag == "--out":  # required for train, a default folder for autobits
            continue
        assert train[flag] is auto[flag], f"{flag} is defined twice (not through the shared parent parser)"


def test_train_and_autobits_parse_the_shared_flags_alike():
    argv = ["--model", "cnn", "--data", "mnist", "--fp-steps", "3", "--steps", "4", "--lr", "0.5", "--batch-size",
            "16", "--seed", "7", "--first-last", "0", "--hybrid", "--train-subset", "64", "--no-progress"]
    t = vars(cli.build_parser().parse_args(["train", *argv, "--out", "x"]))
    a = vars(cli.build_parser().parse_args(["autobits", *argv, "--out", "x", "--avg-bits", "3"]))
    common = set(t) & set(a) - {"command"}
    assert {k: t[k] for k in common} == {k: a[k] for k in common}
    assert (t["model"], t["fp_steps"], t["lr"], t["first_last"], t["hybrid"], t["progress"]) == ("cnn", 3, 0.5, 0,
                                                                                                  True, False)
