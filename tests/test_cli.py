"""The `flannel` entry point: stage dispatch and logging set-up."""
import logging

import pytest

from flannel.cli import CHATTY_LOGGERS, STAGES, main


def test_every_stage_registers_its_subcommands():
    for stage in STAGES:
        with pytest.raises(SystemExit) as exit_info:
            main([stage, "--help"])
        assert exit_info.value.code == 0


def test_a_command_runs_and_keeps_progress_logs_visible(tmp_path, capsys):
    root = logging.getLogger()
    saved = root.level, [(n, logging.getLogger(n).level) for n in CHATTY_LOGGERS]
    try:
        assert main(["data", "synth", str(tmp_path / "s"), "--n-per-class", "2", "--size", "64"]) == 0
        # Stage progress lines log at INFO on the root handler; only the exporter's per-pass
        # loggers are quieted.
        assert root.getEffectiveLevel() == logging.INFO
        assert all(logging.getLogger(n).level == logging.WARNING for n in CHATTY_LOGGERS)
        assert len(list((tmp_path / "s").rglob("*/images/*"))) == 6
    finally:
        root.setLevel(saved[0])
        for name, level in saved[1]:
            logging.getLogger(name).setLevel(level)


def test_predict_sends_to_the_only_served_model_when_none_is_named(tmp_path, monkeypatch,
                                                                   capsys):
    from flannel.handlers import client, ts_config, ts_process

    config = tmp_path / "config.properties"
    config.write_text("inference_address=http://127.0.0.1:9\n")
    info = ts_config.server_info(config)
    info.models = {"ensemble": 1}
    monkeypatch.setattr(ts_process, "server_status", lambda cfg: info)
    sent = []

    def fake_http(files, model, **kw):
        sent.append((model, kw["token"]))
        return [client.PredictResult(str(f), 200, {"prediction": "Normal",
                                                   "probabilities": {"Normal": 1.0}}, "")
                for f in files]
    monkeypatch.setattr(client, "predict_http", fake_http)
    monkeypatch.setenv("FLANNEL_INFERENCE_KEY", "k")
    assert main(["predict", "a.png", "--config", str(config)]) == 0
    assert sent == [("ensemble", "k")] and "a.png\t200\tNormal" in capsys.readouterr().out


def test_predict_takes_a_key_from_a_file_never_from_the_command_line(tmp_path, monkeypatch,
                                                                     capsys):
    import json

    from flannel.handlers import client

    config = tmp_path / "config.properties"
    config.write_text("inference_address=http://127.0.0.1:9\n")
    sent = []
    monkeypatch.setattr(client, "predict_http", lambda files, model, **kw: sent.append(
        kw["token"]) or [client.PredictResult(str(f), 200, {}, "") for f in files])
    monkeypatch.setenv("FLANNEL_INFERENCE_KEY", "from-env")
    (tmp_path / "key.txt").write_text("plain-key\n")
    (tmp_path / "key_file.json").write_text(json.dumps(
        {"inference": {"key": "json-key"}, "management": {"key": "m"}, "API": {"key": "a"}}))
    for token_file, want in (("key.txt", "plain-key"), ("key_file.json", "json-key")):
        assert main(["predict", "a.png", "--model", "m", "--config", str(config),
                     "--token-file", str(tmp_path / token_file)]) == 0
        assert sent.pop() == want  # the file wins over the environment
    (tmp_path / "empty.txt").write_text("\n")
    assert main(["predict", "a.png", "--model", "m", "--config", str(config),
                 "--token-file", str(tmp_path / "empty.txt")]) == 2
    assert "no inference key in" in capsys.readouterr().out and not sent
    with pytest.raises(SystemExit) as refused:
        main(["predict", "a.png", "--config", str(config), "--token", "k"])
    assert refused.value.code == 2 and "--token-file" in capsys.readouterr().err
