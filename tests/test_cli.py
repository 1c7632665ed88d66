"""`vllm-sjd serve`: the vllm serve command line it builds."""

import json

import pytest

from vllm_sjd.cli import DEFAULT_SPECULATIVE_CONFIG, DEMO_MODEL_PATH, serve_command


def test_a_named_model_gets_sjd_the_endpoint_and_float32_on_cpu(monkeypatch):
    monkeypatch.setenv("VLLM_PLUGINS", "other")
    command, env = serve_command(["/models/x", "--port", "9000"], has_gpu=False)
    assert command[:3] == ["vllm", "serve", "/models/x"]
    assert command[3:5] == ["--port", "9000"]
    spec = command[command.index("--speculative-config") + 1]
    assert json.loads(spec) == json.loads(DEFAULT_SPECULATIVE_CONFIG)
    assert command[command.index("--dtype") + 1] == "float32"
    assert command[command.index("--per-request-spec-decode-metrics") + 1] == "summary"
    assert env["VLLM_PLUGINS"].split(",") == ["other", "sjd", "sjd_images"]


def test_the_users_settings_win(monkeypatch):
    monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    user_spec = '{"method": "sjd", "num_speculative_tokens": 4}'
    command, _ = serve_command(["m", "--speculative-config", user_spec, "--dtype", "bfloat16",
                                "--per-request-spec-decode-metrics=none"], has_gpu=False)
    assert command.count("--speculative-config") == 1 and user_spec in command
    assert command.count("--dtype") == 1 and "bfloat16" in command
    assert "--per-request-spec-decode-metrics" not in command
    gpu_command, _ = serve_command(["m"], has_gpu=True)
    assert "--dtype" not in gpu_command


def test_speculative_config_null_serves_plain_ar_without_speculative_metrics():
    for spec in (["--speculative-config", "null"], ["--speculative-config=null"]):
        command, _ = serve_command(["m", *spec], has_gpu=False)
        assert "--per-request-spec-decode-metrics" not in command
        assert sum(o.startswith("--speculative-config") for o in command) == 1


def test_no_model_means_the_demo_model():
    if not (DEMO_MODEL_PATH / "config.json").is_file():
        with pytest.raises(SystemExit, match="demo model is missing"):
            serve_command([], has_gpu=False)
        return
    command, _ = serve_command(["--port", "1"], has_gpu=False)
    assert command[2] == str(DEMO_MODEL_PATH)
    assert command[command.index("--served-model-name") + 1] == "vllm-sjd-demo"


def test_a_llamagen_folder_gets_prompt_embeddings_and_no_tokenizer(tmp_path):
    from vllm_sjd.testing.tiny_llamagen import tiny_config

    tiny_config().save_pretrained(tmp_path)
    command, _ = serve_command([str(tmp_path)], has_gpu=True)
    assert "--skip-tokenizer-init" in command and "--enable-prompt-embeds" in command
    given, _ = serve_command([str(tmp_path), "--enable-prompt-embeds"], has_gpu=True)
    assert given.count("--enable-prompt-embeds") == 1
    demo, _ = serve_command([str(DEMO_MODEL_PATH)], has_gpu=True)
    assert "--skip-tokenizer-init" not in demo and "--enable-prompt-embeds" not in demo
