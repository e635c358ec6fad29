"""Run in the circuit-tracer venv (benchmarks/.venv-circuit-tracer): circuit-tracer's own classes write and read
transcoder files, so that mechscope's reader / writer can be checked against them (see
tests/sae/test_circuit_tracer_format.py, which runs this when that venv exists).

    python _peer_circuit_tracer.py write OUT     # random PLT set (JumpReLU + skip) and CLT (JumpReLU) + their outputs
    python _peer_circuit_tracer.py read IN OUT   # load IN/plt and IN/clt with circuit-tracer, write its outputs
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

L, D, N = 3, 16, 24


def inputs() -> torch.Tensor:
    return torch.randn(L, 5, D, generator=torch.Generator().manual_seed(7))  # [L, pos, d]


def outputs(ts, clt) -> dict[str, torch.Tensor]:
    """Feature acts and reconstructions, computed by circuit-tracer, on fixed inputs."""
    x = inputs()
    out = {"x": x}
    with torch.no_grad():
        for i in range(L):
            acts = ts[i].encode(x[i])
            out[f"plt_acts_{i}"] = acts
            out[f"plt_out_{i}"] = ts[i].decode(acts, x[i])
            out[f"clt_acts_{i}"] = clt.encode_layer(x[i], i)
        out["clt_out"] = clt(x)
    return out


def write(folder: Path) -> None:
    from circuit_tracer.transcoder.activation_functions import JumpReLU
    from circuit_tracer.transcoder.cross_layer_transcoder import CrossLayerTranscoder
    from circuit_tracer.transcoder.single_layer_transcoder import SingleLayerTranscoder, TranscoderSet

    torch.manual_seed(0)
    layers = {}
    for i in range(L):
        t = SingleLayerTranscoder(D, N, JumpReLU(torch.rand(N) * 0.5, 0.1), i, skip_connection=True,
                                  device=torch.device("cpu"), dtype=torch.float32)
        for p in t.parameters():
            p.data.normal_(0, 0.5)
        t.activation_function.threshold.data = torch.rand(N) * 0.5
        layers[i] = t
    ts = TranscoderSet(layers, feature_input_hook="mlp.hook_in", feature_output_hook="mlp.hook_out")
    ts.to_safetensors(str(folder / "plt"))
    (folder / "plt" / "config.yaml").write_text("model_kind: transcoder_set\nmodel_name: peer-test\n"
                                                "feature_input_hook: mlp.hook_in\nfeature_output_hook: mlp.hook_out\n")
    clt = CrossLayerTranscoder(L, N, D, activation_function="jump_relu", lazy_decoder=False,
                               device=torch.device("cpu"), dtype=torch.float32)
    for p in clt.parameters():
        p.data.normal_(0, 0.5)
    clt.activation_function.threshold.data = torch.rand(L, 1, N) * 0.5
    clt.to_safetensors(str(folder / "clt"))
    save_file({k: v.contiguous() for k, v in outputs(ts, clt).items()}, str(folder / "peer_outputs.safetensors"))


def read(folder: Path, out: Path) -> None:
    from circuit_tracer.transcoder.cross_layer_transcoder import load_clt
    from circuit_tracer.transcoder.single_layer_transcoder import load_transcoder_set

    paths = {i: str(folder / "plt" / f"layer_{i}.safetensors") for i in range(L)}
    ts = load_transcoder_set(paths, scan="test", feature_input_hook="mlp.hook_in", feature_output_hook="mlp.hook_out",
                             device=torch.device("cpu"), dtype=torch.float32, lazy_encoder=False, lazy_decoder=False)
    clt = load_clt(str(folder / "clt"), device=torch.device("cpu"), dtype=torch.float32, lazy_decoder=False)
    save_file({k: v.contiguous() for k, v in outputs(ts, clt).items()}, str(out))
    assert load_file(str(out))


if __name__ == "__main__":
    if sys.argv[1] == "write":
        write(Path(sys.argv[2]))
    else:
        read(Path(sys.argv[2]), Path(sys.argv[3]))
