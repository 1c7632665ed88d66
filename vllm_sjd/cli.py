"""`vllm-sjd serve [MODEL] [vLLM options]`: `vllm serve` with the plugin's defaults.
(`vllm-sjd selfcheck`: checks SJD in vLLM's engine on this machine; vllm_sjd/selfcheck.py.)

- no MODEL: the bundled demo model (vllm_sjd/demo/model), named "vllm-sjd-demo";
- SJD on (K = 16) unless --speculative-config is given, with vLLM's
  per-request speculative metrics on (the image endpoint's pass counts);
  `--speculative-config null` serves plain AR;
- the image endpoint on (VLLM_PLUGINS gains sjd and sjd_images);
- on a machine without a GPU, float32 unless --dtype is given;
- a LlamaGen-T2I folder (its captions are prompt embeddings, it has no
  tokenizer): --skip-tokenizer-init and --enable-prompt-embeds.
Everything else passes through to `vllm serve` unchanged.
"""

import json
import os
import shutil
import sys
from pathlib import Path

DEMO_MODEL_PATH = Path(__file__).resolve().parent / "demo" / "model"
DEFAULT_SPECULATIVE_CONFIG = '{"method": "sjd", "num_speculative_tokens": 16}'
DEMO_MODEL_NAME = "vllm-sjd-demo"
USAGE = "usage: vllm-sjd serve [MODEL] [vllm serve options]\n       vllm-sjd selfcheck [--help]"


def serve_command(argv: list[str], has_gpu: bool) -> tuple[list[str], dict[str, str]]:
    """The `vllm serve` command line and the environment additions for `argv`."""
    options = list(argv)
    if options and not options[0].startswith("-"):
        model = options.pop(0)
    else:
        if not (DEMO_MODEL_PATH / "config.json").is_file():
            raise SystemExit(f"vllm-sjd: the demo model is missing from {DEMO_MODEL_PATH}")
        model = str(DEMO_MODEL_PATH)
        if "--served-model-name" not in options:
            options += ["--served-model-name", DEMO_MODEL_NAME]
    if not _given(options, "--speculative-config"):
        options += ["--speculative-config", DEFAULT_SPECULATIVE_CONFIG]
    speculative = _value(options, "--speculative-config") not in ("null", "None", "")
    if speculative and not _given(options, "--per-request-spec-decode-metrics"):
        options += ["--per-request-spec-decode-metrics", "summary"]
    if not has_gpu and "--dtype" not in options:
        options += ["--dtype", "float32"]
    if _takes_caption_embeddings(model):
        options += [f for f in ("--skip-tokenizer-init", "--enable-prompt-embeds") if not _given(options, f)]
    plugins = [p for p in os.environ.get("VLLM_PLUGINS", "").split(",") if p]
    plugins += [p for p in ("sjd", "sjd_images") if p not in plugins]
    return ["vllm", "serve", model, *options], {"VLLM_PLUGINS": ",".join(plugins)}


def _takes_caption_embeddings(model: str) -> bool:
    """A local LlamaGen-T2I folder (config.json of model_type "llamagen_t2i")."""
    try:
        model_type = json.loads((Path(model) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return False
    from vllm_sjd.models.llamagen_config import MODEL_TYPE

    return model_type == MODEL_TYPE


def _given(options: list[str], flag: str) -> bool:
    return any(o == flag or o.startswith(flag + "=") for o in options)


def _value(options: list[str], flag: str) -> str | None:
    """The value of the last `flag VALUE` or `flag=VALUE` in options."""
    value = None
    for i, option in enumerate(options):
        if option == flag and i + 1 < len(options):
            value = options[i + 1]
        elif option.startswith(flag + "="):
            value = option.split("=", 1)[1]
    return value


def _has_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["selfcheck"]:
        from vllm_sjd.selfcheck import main as selfcheck

        return selfcheck(argv[1:])
    if not argv or argv[0] != "serve" or argv[1:2] in (["-h"], ["--help"]):
        print(USAGE + "\n" + __doc__, file=sys.stderr)
        return 0 if argv[1:2] in (["-h"], ["--help"]) else 2
    command, env = serve_command(argv[1:], _has_gpu())
    executable = shutil.which("vllm") or str(Path(sys.executable).parent / "vllm")
    print(f"vllm-sjd: VLLM_PLUGINS={env['VLLM_PLUGINS']} {' '.join(command)}", file=sys.stderr, flush=True)
    os.environ.update(env)
    os.execv(executable, [executable, *command[1:]])
    return 0  # not reached


if __name__ == "__main__":
    raise SystemExit(main())
