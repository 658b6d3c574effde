"""
Export of Pix2Seq for deployment, as optimum exports encoder-decoder models: three graphs, built on the model's public
`forward` (`encoder_outputs`, `cache`):

- `encoder`: `pixel_values [batch, 3, S, S]` -> `encoder_hidden_states [batch, memory, decoder_hidden_size]`;
- `decoder`: the first step, `input_ids [batch, 1]` (the detection prompt) + `encoder_hidden_states` -> `logits
  [batch, vocab]` and `present.{i}.decoder.key/value` (self-attention, `[batch, heads, 1, head_dim]`) and
  `present.{i}.encoder.key/value` (cross-attention keys/values of the image, computed once);
- `decoder_with_past`: every later step, `input_ids [batch, 1]` + `encoder_hidden_states` +
  `past_key_values.{i}.decoder.key/value` (`[batch, heads, past, head_dim]`) + `past_key_values.{i}.encoder.key/value`
  -> `logits` and `present.{i}.decoder.key/value` (`[batch, heads, past + 1, head_dim]`).

Batch and past length are dynamic; the image size is the one exported with (the processor's canvas).
`export_programs` gives `torch.export` programs (saved as `.pt2` by `save_programs`), `export_onnx` ONNX files (run
with onnxruntime); `ExportedPix2Seq` runs detection from either with the model's token grammar and returns what
`model.generate(..., return_dict_in_generate=True, output_logits=True)` returns, for
`processor.post_process_object_detection`.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from torch import nn
from transformers.cache_utils import EncoderDecoderCache
from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria, StoppingCriteriaList
from transformers.generation.utils import GenerateEncoderDecoderOutput

from .box_codec import Pix2SeqBoxCodec, Pix2SeqTokenLayout
from .fast_generation import decoding_loop
from .generation_pix2seq import (
    _GRAMMAR_OPTIONS,
    PIX2SEQ_GENERATION_DEFAULTS,
    Pix2SeqLogitsProcessor,
    detections_from_tokens,
    pix2seq_generation_options,
)


GRAPH_NAMES = ("encoder", "decoder", "decoder_with_past")
EXPORT_CONFIG_NAME = "export_config.json"


def _past_names(num_layers: int, prefix: str, with_cross: bool = True) -> list[str]:
    names = []
    for layer in range(num_layers):
        names += [f"{prefix}.{layer}.decoder.key", f"{prefix}.{layer}.decoder.value"]
        if with_cross:
            names += [f"{prefix}.{layer}.encoder.key", f"{prefix}.{layer}.encoder.value"]
    return names


def graph_io_names(num_layers: int) -> dict[str, tuple[list[str], list[str]]]:
    """The input and output names of each graph (optimum's naming of past and present keys/values)."""
    return {
        "encoder": (["pixel_values"], ["encoder_hidden_states"]),
        "decoder": (["input_ids", "encoder_hidden_states"], ["logits", *_past_names(num_layers, "present")]),
        "decoder_with_past": (
            ["input_ids", "encoder_hidden_states", *_past_names(num_layers, "past_key_values")],
            ["logits", *_past_names(num_layers, "present", with_cross=False)],
        ),
    }


class Pix2SeqEncoderExport(nn.Module):
    """`pixel_values` -> the encoded image the decoder attends to (holds the encoder only)."""

    def __init__(self, model):
        super().__init__()
        self.encoder = model.model.encoder

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.encoder(pixel_values).last_hidden_state


class _EncoderSetAside(nn.Module):
    """Stands in for the encoder in the decoder graphs: runs nothing, and holds the auxiliary head only for a model
    with `auxiliary_copy`, whose logits read it at every step."""

    def __init__(self, encoder, config):
        super().__init__()
        self.auxiliary_head = encoder.auxiliary_head if config.auxiliary_copy else None


@contextlib.contextmanager
def _without_encoder(model):
    """
    The model with its encoder set aside: the decoder graphs get `encoder_outputs` and never run it, and an exported
    program keeps every parameter of the module it was exported from.
    """
    encoder = model.model.encoder
    model.model.encoder = _EncoderSetAside(encoder, model.config)
    try:
        yield model
    finally:
        model.model.encoder = encoder


class Pix2SeqDecoderExport(nn.Module):
    """
    One decoding step through `Pix2SeqForObjectDetection.forward` with a cache. Without past (`with_past=False`) it
    returns the logits and the self- and cross-attention keys/values of every layer; with past (the `4 * layers` cached
    tensors as extra inputs, per layer self key, self value, cross key, cross value) the logits and the grown
    self-attention keys/values.
    """

    def __init__(self, model, with_past: bool):
        super().__init__()
        self.model = model
        self.with_past = with_past
        self.num_layers = model.config.decoder_layers

    def forward(self, input_ids: torch.Tensor, encoder_hidden_states: torch.Tensor, *past: torch.Tensor):
        cache = None
        if self.with_past:
            cache = EncoderDecoderCache([tuple(past[4 * i : 4 * i + 4]) for i in range(self.num_layers)])
        outputs = self.model(
            decoder_input_ids=input_ids, encoder_outputs=(encoder_hidden_states,), cache=cache, use_cache=True
        )
        present = []
        for layer in range(self.num_layers):
            self_attention = outputs.cache.self_attention_cache.layers[layer]
            present += [self_attention.keys, self_attention.values]
            if not self.with_past:
                cross_attention = outputs.cache.cross_attention_cache.layers[layer]
                present += [cross_attention.keys, cross_attention.values]
        return (outputs.logits[:, -1], *present)


def _example_inputs(model, batch_size: int, image_size: int) -> dict[str, tuple]:
    """Inputs to trace each graph with (a past of 2 tokens; batch 2, so that batch is not specialised to 1)."""
    config = model.config
    device = next(model.parameters()).device
    pixel_values = torch.rand(batch_size, config.num_channels, image_size, image_size, device=device)
    with torch.no_grad():
        encoder_hidden_states = Pix2SeqEncoderExport(model)(pixel_values)
        prompt = torch.full((batch_size, 1), config.bos_token_id, device=device)
        first = Pix2SeqDecoderExport(model, with_past=False)(prompt, encoder_hidden_states)
        token = torch.full((batch_size, 1), config.coord_token_offset, device=device)
        past = list(first[1:])
        second = Pix2SeqDecoderExport(model, with_past=True)(token, encoder_hidden_states, *past)
    for layer in range(config.decoder_layers):
        past[4 * layer], past[4 * layer + 1] = second[1 + 2 * layer], second[2 + 2 * layer]
    return {
        "encoder": (pixel_values,),
        "decoder": (prompt, encoder_hidden_states),
        "decoder_with_past": (token, encoder_hidden_states, *past),
    }


def _dynamic_shapes(model) -> dict[str, dict]:
    config = model.config
    batch = torch.export.Dim("batch", min=1, max=1024)
    past = torch.export.Dim("past", min=1, max=config.max_position_embeddings - 1)
    past_shapes = tuple({0: batch, 2: past} if i % 4 < 2 else {0: batch} for i in range(4 * config.decoder_layers))
    return {
        "encoder": {"pixel_values": {0: batch}},
        "decoder": {"input_ids": {0: batch}, "encoder_hidden_states": {0: batch}},
        "decoder_with_past": {"input_ids": {0: batch}, "encoder_hidden_states": {0: batch}, "past": past_shapes},
    }


def export_programs(model, image_size: int) -> dict[str, torch.export.ExportedProgram]:
    """
    `torch.export` programs of the three graphs (see the module docstring).

    Args:
        model (`Pix2SeqForObjectDetection`): put in eval mode for the export.
        image_size (`int`): the canvas the images come in (`processor.image_processor.size["longest_edge"]`).

    Returns:
        `dict` name -> `torch.export.ExportedProgram`, for `"encoder"`, `"decoder"`, `"decoder_with_past"`.
    """
    model.eval()
    examples = _example_inputs(model, 2, image_size)
    shapes = _dynamic_shapes(model)
    modules = {
        "encoder": Pix2SeqEncoderExport(model),
        "decoder": Pix2SeqDecoderExport(model, with_past=False),
        "decoder_with_past": Pix2SeqDecoderExport(model, with_past=True),
    }
    programs = {}
    with torch.no_grad():
        programs["encoder"] = torch.export.export(modules["encoder"], examples["encoder"], dynamic_shapes=shapes["encoder"])
        with _without_encoder(model):
            for name in ("decoder", "decoder_with_past"):
                programs[name] = torch.export.export(modules[name], examples[name], dynamic_shapes=shapes[name])
    return programs


def _export_config(model, image_size: int) -> dict:
    config = model.config
    options = pix2seq_generation_options(model.generation_config)
    grammar = {key: options[key] for key in _GRAMMAR_OPTIONS}
    return {
        "image_size": image_size,
        "num_layers": config.decoder_layers,
        "max_new_tokens": int(model.generation_config.max_new_tokens or config.token_layout.max_sequence_length),
        "max_position_embeddings": config.max_position_embeddings,
        "token_layout": config.token_layout.to_dict(),
        "grammar": grammar,
        "coordinate_window": options["coordinate_window"],
    }


def save_programs(programs: dict, model, image_size: int, folder: str | Path) -> dict[str, Path]:
    """Saves `export_programs`' programs as `folder/{name}.pt2` with `export_config.json`; returns the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, program in programs.items():
        paths[name] = folder / f"{name}.pt2"
        torch.export.save(program, paths[name])
    (folder / EXPORT_CONFIG_NAME).write_text(json.dumps(_export_config(model, image_size), indent=2))
    return paths


def export_onnx(
    model,
    image_size: int,
    folder: str | Path,
    programs: dict | None = None,
    opset_version: int = 18,
    optimize: bool = True,
) -> dict[str, Path]:
    """
    Exports the three graphs to `folder/{name}.onnx` (with `export_config.json`), through `torch.onnx.export`'s
    `torch.export`-based exporter (needs `onnx` and `onnxscript`: `pip install "pix2seq_hf[export]"`).

    Args:
        model (`Pix2SeqForObjectDetection`): the model.
        image_size (`int`): the canvas the images come in.
        folder (`str` or `Path`): where to write.
        programs (`dict`, *optional*): `export_programs(model, image_size)` when already made.
        opset_version (`int`, *optional*, defaults to 18): the ONNX opset.
        optimize (`bool`, *optional*, defaults to `True`): run the ONNX graph optimiser (constant folding, fusions).

    Returns:
        `dict` name -> path of the `.onnx` file.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    programs = programs or export_programs(model, image_size)
    names = graph_io_names(model.config.decoder_layers)
    paths = {}
    for name in GRAPH_NAMES:
        paths[name] = folder / f"{name}.onnx"
        input_names, output_names = names[name]
        onnx_program = torch.onnx.export(
            programs[name],
            (),
            input_names=input_names,
            output_names=output_names,
            opset_version=opset_version,
            dynamo=True,
            optimize=optimize,
            external_data=False,
            verbose=False,
        )
        onnx_program.save(str(paths[name]))
    (folder / EXPORT_CONFIG_NAME).write_text(json.dumps(_export_config(model, image_size), indent=2))
    return paths


class ExportedPix2Seq:
    """
    Detection from exported graphs: the encoder once, then greedy decoding step by step with the cached decoder,
    with the model's token grammar (`Pix2SeqLogitsProcessor` and the grammar settings of its generation config, saved
    in `export_config.json`). Greedy decoding gives the tokens of `model.generate(pixel_values, do_sample=False)`.

    Build it with `ExportedPix2Seq.from_onnx(folder)` (onnxruntime), or, for graphs from a trusted source only,
    `ExportedPix2Seq.from_torch_export(folder, trusted_source=True)` (`.pt2` archives are unpickled).
    """

    def __init__(self, graphs: dict, export_config: dict, backend: str):
        self.graphs = graphs
        self.config = export_config
        self.backend = backend
        self.num_layers = export_config["num_layers"]
        self.token_layout = Pix2SeqTokenLayout(**export_config["token_layout"])
        self.box_codec = Pix2SeqBoxCodec(self.token_layout)
        self.io_names = graph_io_names(self.num_layers)

    @classmethod
    def from_onnx(cls, folder: str | Path, providers: list[str] | None = None, num_threads: int | None = None):
        """Loads `folder/{encoder,decoder,decoder_with_past}.onnx` into onnxruntime sessions."""
        import onnxruntime

        folder = Path(folder)
        options = onnxruntime.SessionOptions()
        if num_threads:
            options.intra_op_num_threads = num_threads
        providers = providers or ["CPUExecutionProvider"]
        graphs = {
            name: onnxruntime.InferenceSession(str(folder / f"{name}.onnx"), options, providers=providers)
            for name in GRAPH_NAMES
        }
        return cls(graphs, json.loads((folder / EXPORT_CONFIG_NAME).read_text()), "onnx")

    @classmethod
    def from_torch_export(cls, folder: str | Path, trusted_source: bool = False):
        """
        Loads `folder/{encoder,decoder,decoder_with_past}.pt2` (`torch.export.load`).

        `torch.export.load` unpickles the archives, which runs whatever code they hold: load only graphs you exported
        yourself or got from a source you trust, and say so with `trusted_source=True`. ONNX graphs (`from_onnx`)
        hold no code and are the way to load graphs from others.

        Raises:
            `ValueError` without `trusted_source=True`.
        """
        folder = Path(folder)
        if not trusted_source:
            raise ValueError(
                f"Loading the torch.export graphs of {folder} unpickles them (torch.export.load), which runs any code "
                "they hold. Load .pt2 files only from a source you trust, with "
                "`ExportedPix2Seq.from_torch_export(folder, trusted_source=True)`, or load the ONNX graphs with "
                "`ExportedPix2Seq.from_onnx(folder)`, which run no Python code."
            )
        graphs = {name: torch.export.load(folder / f"{name}.pt2").module() for name in GRAPH_NAMES}
        return cls(graphs, json.loads((folder / EXPORT_CONFIG_NAME).read_text()), "torch")

    def _run(self, name: str, *inputs: torch.Tensor) -> list[torch.Tensor]:
        if self.backend == "torch":
            with torch.no_grad():
                outputs = self.graphs[name](*inputs)
            return list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]
        session = self.graphs[name]
        feeds = dict(zip(self.io_names[name][0], inputs))
        wanted = {i.name for i in session.get_inputs()}  # an input the exporter found unused is not a graph input
        feeds = {key: value.cpu().numpy() for key, value in feeds.items() if key in wanted}
        return [torch.from_numpy(array) for array in session.run(None, feeds)]

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The encoder graph: `[batch, memory, hidden]`."""
        return self._run("encoder", pixel_values)[0]

    def generate(
        self, pixel_values: torch.Tensor, max_new_tokens: int | None = None, **grammar
    ) -> GenerateEncoderDecoderOutput:
        """
        Greedy detection of a batch of images (`[batch, 3, S, S]`, as the processor makes them), in the decoding loop
        of `model.generate` ([`fast_generation.decoding_loop`]) over the exported graphs: images whose sequence ended
        stop being computed.

        Args:
            pixel_values (`torch.Tensor`): the images.
            max_new_tokens (`int`, *optional*): default: the model's (`5 * max_objects`).
            **grammar: `Pix2SeqLogitsProcessor` options replacing the saved ones (`eos_bias`, `min_objects`, ...).

        Returns:
            `Pix2SeqGenerateOutput` with `sequences` (`[batch, 1 + steps]`, finished rows padded), `logits` (the raw
            logits of each step, zeros for rows that had ended) and the `detections` read from them with the model's
            `coordinate_window`, as `model.generate(..., return_dict_in_generate=True, output_logits=True)`.
        """
        from .modeling_pix2seq import Pix2SeqGenerateOutput

        layout = self.token_layout
        max_new_tokens = max_new_tokens or self.config["max_new_tokens"]
        limit = self.config["max_position_embeddings"] - 1
        if max_new_tokens > limit:
            raise ValueError(f"`max_new_tokens={max_new_tokens}` exceeds the decoder's {limit} positions after the prompt.")
        processor = Pix2SeqLogitsProcessor(layout, prompt_length=1, **{**self.config["grammar"], **grammar})
        encoder_hidden_states = self.encode(pixel_values)
        past = None

        def step(token_ids: torch.Tensor, length: int, keep: torch.Tensor | None) -> torch.Tensor:
            nonlocal encoder_hidden_states, past
            if keep is not None:
                encoder_hidden_states = encoder_hidden_states.index_select(0, keep)
                past = [tensor.index_select(0, keep) for tensor in past]
            if past is None:
                logits, *past = self._run("decoder", token_ids, encoder_hidden_states)
            else:
                logits, *present = self._run("decoder_with_past", token_ids, encoder_hidden_states, *past)
                for layer in range(self.num_layers):
                    past[4 * layer], past[4 * layer + 1] = present[2 * layer], present[2 * layer + 1]
            return logits.float()

        prompt = torch.full((pixel_values.shape[0], 1), layout.bos_token_id, dtype=torch.long)
        max_length = 1 + max_new_tokens
        stopping_criteria = StoppingCriteriaList(
            [MaxLengthCriteria(max_length=max_length), EosTokenCriteria(eos_token_id=layout.eos_token_id)]
        )
        sequences, _, logits, _ = decoding_loop(
            step,
            prompt,
            [processor],
            stopping_criteria,
            max_length=max_length,
            pad_token_id=layout.pad_token_id,
            output_logits=True,
        )
        output = GenerateEncoderDecoderOutput(sequences=sequences, logits=logits)
        # Files written before the option existed read as the package reads by default.
        window = self.config.get("coordinate_window", PIX2SEQ_GENERATION_DEFAULTS["coordinate_window"])
        detections = detections_from_tokens(output, self.box_codec, window, layout.max_objects)
        return Pix2SeqGenerateOutput(**output, detections=detections)


__all__ = [
    "EXPORT_CONFIG_NAME",
    "GRAPH_NAMES",
    "ExportedPix2Seq",
    "Pix2SeqDecoderExport",
    "Pix2SeqEncoderExport",
    "export_onnx",
    "export_programs",
    "graph_io_names",
    "save_programs",
]
