"""Janus-Pro's image codes get token ids of their own: the engine's vocabulary widens.

Wraps vllm.engine.arg_utils.EngineArgs.create_model_config (front-end
process: the API server or the LLM's process; the model config then travels
to the engine core and the workers), and renews ModelConfig.model_arch_config
with ModelConfig.get_model_arch_config. Checked on vLLM 0.32.0 and 0.33.0.

Why: vLLM samples from one vocabulary per model, the text config's
vocab_size. Janus predicts image codes with a separate head over its own
codebook, whose indices overlap the text ids; the plugin's Janus model
(vllm_sjd/models/janus.py) gives code c the id text_vocab + c, so its text
config must count text_vocab + num_codes ids. The text size is kept in the
text config as `sjd_text_vocab_size`. Only configs of Janus's architecture
change. Retire when a vLLM model can declare a vocabulary beyond its text
config's (or sample from a second head).
"""

from vllm.engine.arg_utils import EngineArgs

from vllm_sjd.models.janus_config import ARCHITECTURE, widen_vocabulary
from vllm_sjd.patches.wrapping import install_wrapper

_original_create_model_config = EngineArgs.create_model_config


def _create_model_config(self):
    model_config = _original_create_model_config(self)
    if ARCHITECTURE in (getattr(model_config.hf_config, "architectures", None) or ()):
        widen_vocabulary(model_config.hf_config)
        # The architecture summary (get_vocab_size reads it) was made from the text config.
        model_config.model_arch_config = model_config.get_model_arch_config()
    return model_config


def install() -> None:
    install_wrapper(EngineArgs, "create_model_config", _create_model_config)
