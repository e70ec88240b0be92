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
        sent.append(model)
        return [client.PredictResult(str(f), 200, {"prediction": "Normal",
                                                   "probabilities": {"Normal": 1.0}}, "")
                for f in files]
    monkeypatch.setattr(client, "predict_http", fake_http)
    assert main(["predict", "a.png", "--config", str(config), "--token", "k"]) == 0
    assert sent == ["ensemble"] and "a.png\t200\tNormal" in capsys.readouterr().out
