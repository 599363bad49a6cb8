"""``trainer-server`` argument parsing: models, keys, TLS pairing, limits and their errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer_server.__main__ import parse_args


def test_models_keys_and_limits(llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text("alpha  # the first key\n\n# a comment line\nbeta\n")
    monkeypatch.setenv("TRAINER_API_KEYS", "gamma, delta")
    config = parse_args(
        [
            "--model", f"a={llama_dir}", "--model", f"b={llama_dir}", "--port", "0",
            "--api-key-file", str(keys), "--max-sessions", "3", "--checkpoint-dir", str(tmp_path / "ck"),
        ]
    )  # fmt: skip
    assert config.models == {"a": llama_dir, "b": llama_dir}
    assert config.api_keys == frozenset({"alpha", "beta", "gamma", "delta"})
    assert config.limits.max_sessions == 3
    assert config.checkpoint_dir == tmp_path / "ck"


@pytest.mark.parametrize(
    "argv",
    [
        ["--model", "noequals"],
        ["--model", "x=/definitely/not/a/model"],
        ["--tls-cert", "c.pem"],
        ["--torch-threads", "0"],
        ["--dtype", "int8"],
    ],
)
def test_bad_arguments_exit_with_usage(argv: list[str], llama_dir: Path) -> None:
    with pytest.raises(SystemExit) as info:
        parse_args(argv)
    assert info.value.code == 2


def test_duplicate_model_names_are_refused(llama_dir: Path) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--model", f"a={llama_dir}", "--model", f"a={llama_dir}"])
