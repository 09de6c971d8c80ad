"""aquakv in vLLM: an attention backend whose pages hold AQUA-KV (or HIGGS) codes (docs/vllm.md).

vLLM loads `register` through the `vllm.general_plugins` entry point in every process it starts (front end, engine
core, workers). It swaps in `aquakv.vllm.backend.AquaKVAttentionBackend` for the CPU attention backend, which stays
the stock one in everything it does until an engine is started with `additional_config={"aquakv": {...}}`, and
has the aquakv settings checked where vLLM checks its config, so that a refusal reaches the user at once.
vLLM is not a dependency of aquakv: this package is imported only by vLLM.
"""


def register() -> None:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    from aquakv.vllm.backend import install_config_check

    register_backend(AttentionBackendEnum.CPU_ATTN, "aquakv.vllm.backend.AquaKVAttentionBackend")
    install_config_check()
