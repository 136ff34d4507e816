"""pdbridge inside vLLM: a KV connector (PdbridgeConnector) that moves a hybrid model's
attention KV and recurrent state between a vLLM prefill server and a vLLM decode server of
any TP sizes, with our planner, transport and handshake. vLLM loads it with

    --kv-transfer-config '{"kv_connector": "PdbridgeConnector",
                           "kv_connector_module_path": "pdbridge.vllm", "kv_role": "kv_both"}'

Only connector.py imports vLLM; the rest of the package works without it.
"""


def __getattr__(name):
    if name == "PdbridgeConnector":
        from .connector import PdbridgeConnector
        return PdbridgeConnector
    raise AttributeError(name)
