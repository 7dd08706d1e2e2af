"""
models.py: everything that differs between the vision-language model families the project plays,
and the loading of models and processors.

A family is keyed by `config.model_type` (FAMILIES): qwen2_5_vl, qwen3_vl, internvl (the Hugging
Face-native layout, e.g. OpenGVLab/InternVL3-8B-hf), gemma3, smolvlm (SmolVLM2) and
llava_onevision. For each it holds
  - the stock processor class, and whether that class insists on a video processor (which needs
    torchvision): then an image-only stand-in of the same class is generated from the stock
    class's own __init__ less `video_processor` and registered with AutoProcessor;
  - how pictures go to the processor: a flat list, or one list per prompt (Gemma 3, SmolVLM);
  - the placeholder and marker tokens never to be sampled (a sampled one breaks the next forward
    pass: "Image features and image tokens do not match");
  - the stop token of a turn, the vision tower and its layer class (FSDP2 shard units), and the
    pixel budget (InternVL3's tile count is capped at load);
  - what export.py writes so that the stock class loads the folder (write_stock_processor_files).
What is the same for all: LoRA targets the text model's projections (LORA_TARGETS), and the
per-token inputs a processor returns beside the ids (mm_token_type_ids, token_type_ids) are
extended with zeros (text) over a sampled completion (extend_over_completion).

No command of its own; selfplay.py re-exports the loaders (`selfplay.load_processor(path)`,
`selfplay.load_model(path, device, dtype)`, `selfplay.special_vision_ids(processor)`).
"""
import functools
import inspect
import json
import os
import re
import sys
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Family:
    model_type: str
    name: str  # as people call it
    processor_class: str  # the stock processor class in transformers
    needs_video_processor: bool  # the stock processor cannot be built without torchvision
    images_per_prompt: bool  # pictures go to the processor as [[image], ...], not [image, ...]
    vision_tokens: str  # regex over the vocabulary: placeholder and marker tokens never to sample
    stop_token: str  # ends an assistant turn in the family's chat template
    vision_modules: tuple  # attribute names of the vision tower and projector: generate runs them outside the forward
    vision_layer: str  # class name of one vision tower layer: an FSDP2 shard unit
    image_caps: dict = None  # image-processor settings capped at load: the game's pixel budget


QWEN_VISION = r"<\|(vision_start|vision_end|vision_pad|image_pad|video_pad)\|>"
# The pixel budget of each family, in visual tokens of a 480x320 picture (the game's CLEVR size):
# Qwen2.5-VL one per 28x28 pixels (187), Qwen3-VL one per 32x32 (150), both bounded by the
# processor's min/max pixels; InternVL3 256 per 448-px tile, stock up to 12 tiles and a thumbnail
# (1,792 here), capped at 4 tiles (256 here); Gemma 3 always 256; SmolVLM2 64 or 81 per tile of
# max_image_size; LLaVA-OneVision 729 per 384-px tile, up to 9 tiles (1,836 here).
FAMILIES = {f.model_type: f for f in [
    Family(model_type="qwen2_5_vl", name="Qwen2.5-VL", processor_class="Qwen2_5_VLProcessor",
           needs_video_processor=True, images_per_prompt=False, vision_tokens=QWEN_VISION, stop_token="<|im_end|>",
           vision_modules=("visual",), vision_layer="Qwen2_5_VLVisionBlock"),
    Family(model_type="qwen3_vl", name="Qwen3-VL", processor_class="Qwen3VLProcessor",
           needs_video_processor=True, images_per_prompt=False, vision_tokens=QWEN_VISION, stop_token="<|im_end|>",
           vision_modules=("visual",), vision_layer="Qwen3VLVisionBlock"),
    Family(model_type="internvl", name="InternVL3", processor_class="InternVLProcessor",
           needs_video_processor=True, images_per_prompt=False, vision_tokens=r"<img>|</img>|<IMG_CONTEXT>|<video>",
           stop_token="<|im_end|>", vision_modules=("vision_tower", "multi_modal_projector"),
           vision_layer="InternVLVisionLayer",
           image_caps={"max_patches": 4}),
    Family(model_type="gemma3", name="Gemma 3", processor_class="Gemma3Processor",
           needs_video_processor=False, images_per_prompt=True,
           vision_tokens=r"<start_of_image>|<end_of_image>|<image_soft_token>", stop_token="<end_of_turn>",
           vision_modules=("vision_tower", "multi_modal_projector"),
           vision_layer="SiglipEncoderLayer"),
    Family(model_type="smolvlm", name="SmolVLM2", processor_class="SmolVLMProcessor",
           needs_video_processor=True, images_per_prompt=True,
           vision_tokens=r"<image>|<fake_token_around_image>|<global-img>|<row_\d+_col_\d+>|<video>",
           stop_token="<end_of_utterance>", vision_modules=("vision_model", "connector"),
           vision_layer="SmolVLMEncoderLayer"),
    Family(model_type="llava_onevision", name="LLaVA-OneVision", processor_class="LlavaOnevisionProcessor",
           needs_video_processor=True, images_per_prompt=False, vision_tokens=r"<image>|<video>", stop_token="<|im_end|>",
           vision_modules=("vision_tower", "multi_modal_projector"),
           vision_layer="SiglipEncoderLayer"),
]}
# the text model's attention and MLP projections: `language_model` in every family but SmolVLM's
# `text_model`; the vision tower stays as it is
LORA_TARGETS = r".*(language_model|text_model).*\.(q|k|v|o|gate|up|down)_proj"
# per-token inputs beside input_ids that some processors return (Qwen: mm_token_type_ids, Gemma 3:
# token_type_ids); 0 marks a text token, which every completion token is
PER_TOKEN_INPUTS = ("mm_token_type_ids", "token_type_ids")


def family(model_type):
    """The Family of a config.model_type, or one line naming the supported ones and exit."""
    if model_type not in FAMILIES:
        sys.exit(f"error: model type {model_type!r} is not supported; the supported families are "
                 f"{', '.join(FAMILIES)} (README, 'Model families')")
    return FAMILIES[model_type]


def family_of_model(model):
    """The Family of a loaded model (also through peft, DDP or FSDP2 wrappers)."""
    return family(model.config.model_type)


def family_of_processor(processor):
    """The Family of a processor: the stock class it is, or the stand-in's stock base class."""
    names = {cls.__name__ for cls in type(processor).__mro__}
    for f in FAMILIES.values():
        if f.processor_class in names:
            return f
    sys.exit(f"error: {type(processor).__name__} is not the processor of a supported family "
             f"({', '.join(FAMILIES)}); load the model folder's processor with selfplay.load_processor")


# -----------------------------------------------------------------------------
# Loading


def torchvision_works():
    try:
        import torchvision  # noqa: F401  (a broken install raises at import, not only a missing one)
        return True
    except Exception:
        return False


def from_pretrained(loader, path, **kwargs):
    """loader.from_pretrained(path), or one clear line and exit when there is no such model."""
    try:
        return loader.from_pretrained(path, **kwargs)
    except (OSError, ValueError):  # missing folder, unknown or malformed hub id, no network
        sys.exit(f"error: cannot load model {path!r}: {model_load_problem(path)}; give a model folder "
                 "(e.g. from `python make_tiny_model.py --out tiny-vlm`) or a Hugging Face model id")


def model_load_problem(path):
    """Why a model path did not load, in the user's terms rather than the library's."""
    if os.path.isdir(path):
        return "the folder holds no complete model (config.json, weights, tokenizer and processor files)"
    if os.path.exists(path):
        return "it is a file, not a model folder"
    return "no such folder, and no Hugging Face model of that id could be downloaded (check the id and the network)"


def image_only_processor(fam):
    """The stock processor class of a family less its video processor, generated from the stock
    __init__'s own parameters. Its __init__ must name them (ProcessorMixin reads the accepted
    arguments from __init__.__code__.co_varnames: a **kwargs-only wrapper would drop InternVL's
    image_seq_length). The stock __init__ passes video_processor on positionally; ProcessorMixin
    pairs positional arguments with the subclass's attributes (image_processor, tokenizer), so the
    None is dropped there."""
    import transformers
    stock = getattr(transformers, fam.processor_class)
    kept = [p for name, p in inspect.signature(stock.__init__).parameters.items()
            if name not in ("self", "video_processor") and p.kind is p.POSITIONAL_OR_KEYWORD]
    defaults = {p.name: None if p.default is p.empty else p.default for p in kept}
    source = (f"def __init__(self, {', '.join(f'{p.name}=defaults[{p.name!r}]' for p in kept)}, **kwargs):\n"
              f"    stock.__init__(self, video_processor=None, {', '.join(f'{p.name}={p.name}' for p in kept)}, **kwargs)\n")
    namespace = {"stock": stock, "defaults": defaults}
    exec(compile(source, f"<image-only {fam.processor_class}>", "exec"), namespace)
    return type(f"ImageOnly{fam.processor_class}", (stock,), {"__init__": namespace["__init__"],
                                                             "__module__": __name__})


IMAGE_ONLY = {}  # model_type -> the stand-in class, made once per process


def register_image_only_processors():
    """Make (once) and register the stand-in of every family whose stock processor needs a video
    processor, so that AutoProcessor.from_pretrained returns it for a folder it saved instead of
    a bare tokenizer. Returns {model_type: class}."""
    from transformers import AutoProcessor
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    for f in FAMILIES.values():
        if f.needs_video_processor and f.model_type not in IMAGE_ONLY:
            IMAGE_ONLY[f.model_type] = image_only_processor(f)
            AutoProcessor.register(CONFIG_MAPPING[f.model_type], IMAGE_ONLY[f.model_type], exist_ok=True)
    return IMAGE_ONLY


def load_processor(path):
    """The processor of a model folder or hub id: the stock class when it loads, else (no
    torchvision) the family's image-only stand-in, also for a folder naming the stock class."""
    from transformers import AutoConfig, AutoProcessor
    from transformers.processing_utils import ProcessorMixin
    from transformers.utils import logging
    logging.disable_progress_bar()  # keep the run's own progress bar readable
    fam = family(from_pretrained(AutoConfig, path).model_type)
    if torchvision_works() or not fam.needs_video_processor:
        processor = from_pretrained(AutoProcessor, path)
    else:  # the stand-in reads the project's folders and released ones (which name the stock class) alike
        processor = from_pretrained(register_image_only_processors()[fam.model_type], path)
    if not isinstance(processor, ProcessorMixin):
        sys.exit(f"error: {path} has no image processor (only {type(processor).__name__}); a model folder "
                 "needs its preprocessor_config.json or processor_config.json")
    for name, cap in (fam.image_caps or {}).items():
        setattr(processor.image_processor, name, min(getattr(processor.image_processor, name), cap))
    return processor


def load_model(path, device, dtype):
    from transformers import AutoConfig, AutoModelForImageTextToText
    family(from_pretrained(AutoConfig, path).model_type)  # an unknown family stops here, in one line
    return plain_generation_config(from_pretrained(AutoModelForImageTextToText, path, dtype=dtype).to(device))


def plain_generation_config(model):
    """Give a loaded model a generation_config with its special token ids only. generate() fills
    every field that sampling_settings leaves None (bad_words_ids, sequence_bias, forced
    BOS/EOS, top_h, a length penalty, a watermark, ...) from the model's own config, and None
    cannot be passed to mean "off": so the checkpoint's sampling fields go here, once."""
    from transformers import GenerationConfig
    checkpoint = model.generation_config
    model.generation_config = GenerationConfig(bos_token_id=checkpoint.bos_token_id,
                                               eos_token_id=checkpoint.eos_token_id,
                                               pad_token_id=checkpoint.pad_token_id)
    model.checkpoint_generation_config = checkpoint  # what a saved model folder must keep: write_generation_config
    return model


def write_generation_config(model, folder):
    """Put back the decoding defaults of the checkpoint a model was loaded from (e.g. Qwen2.5-VL-7B-
    Instruct's repetition_penalty 1.05, top_k 1, top_p 0.001, temperature 0.1) into a model folder
    that save_pretrained wrote with the stripped generation_config of plain_generation_config: an
    export or a full checkpoint then decodes, in vLLM or generate(), as the initial model does."""
    getattr(model, "checkpoint_generation_config", model.generation_config).save_pretrained(folder)


# -----------------------------------------------------------------------------
# Inputs and outputs


def processor_inputs(processor, texts, images):
    """The batch of prompts (left-padded) with one picture each, as the family's processor takes
    the pictures (a flat list, or one list per prompt)."""
    if family_of_processor(processor).images_per_prompt:
        images = [[image] for image in images]
    return processor(text=list(texts), images=list(images), padding=True, padding_side="left", return_tensors="pt")


def extend_over_completion(inputs, completion_ids):
    """inputs (of the prompts) with input_ids and attention_mask extended by the completions
    (padding 0 in the mask: completion_ids' rows are right-padded with the pad id, the mask comes
    from the caller) and every per-token input extended with zeros: a completion is text. Without
    mm_token_type_ids Qwen's 3-D rotary positions fall back to 1-D; without token_type_ids Gemma 3
    would treat completion tokens as picture tokens."""
    for key in PER_TOKEN_INPUTS:
        if key in inputs:
            inputs[key] = torch.cat([inputs[key], torch.zeros_like(completion_ids)], 1)
    return inputs


def stop_token_id(processor):
    """The id of the token that ends an assistant turn in the processor's family's chat template."""
    return processor.tokenizer.convert_tokens_to_ids(family_of_processor(processor).stop_token)


def special_vision_ids(processor):
    """Ids of the family's placeholder and marker tokens that the vocabulary has: a sampled one
    would break the next forward pass."""
    return list(vocabulary_matches(processor.tokenizer, family_of_processor(processor).vision_tokens))


@functools.lru_cache(maxsize=8)
def vocabulary_matches(tokenizer, pattern):
    """Sorted ids of the tokens that match a regex, read once per tokenizer: generate asks at every
    call, and a 262k-token vocabulary (Gemma 3) takes a tenth of a second to scan."""
    regex = re.compile(pattern)
    return tuple(sorted(i for token, i in tokenizer.get_vocab().items() if regex.fullmatch(token)))


def shard_units(model):
    """The modules FSDP2 shards one by one, innermost first: every decoder layer, every layer of
    the vision tower, the vision tower and the projector (generate runs them outside the model's
    forward, so they gather their own parameters)."""
    fam = family_of_model(model)
    return [module for name, module in reversed(list(model.named_modules()))
            if type(module).__name__.endswith("DecoderLayer") or type(module).__name__ == fam.vision_layer
            or name.split(".")[-1] in fam.vision_modules]


# -----------------------------------------------------------------------------
# Export


def write_stock_processor_files(folder, write_json):
    """Rewrite the processor files that save_pretrained wrote (transformers 5.x nests them all in
    processor_config.json, under the stand-in's class name where there is one) as a released folder
    of the family has them, so that the stock class loads it with any transformers version and,
    where torchvision is installed, with its video processor: a flat preprocessor_config.json
    naming the stock processor class (transformers also builds the video processor from it), the
    processor's own settings (InternVL's image_seq_length, ...) in processor_config.json, and the
    stock class in tokenizer_config.json. No-op for a folder already in that layout."""
    nested = os.path.join(folder, "processor_config.json")
    if not os.path.exists(nested):
        return
    with open(nested) as f:
        config = json.load(f)
    saved_as = config.get("processor_class", "")
    fam = next((f for f in FAMILIES.values() if saved_as in (f.processor_class, f"ImageOnly{f.processor_class}")), None)
    if fam is None or "image_processor" not in config:
        return
    image = dict(config.pop("image_processor"), processor_class=fam.processor_class)
    size = image.get("size", {})
    if "shortest_edge" in size and "longest_edge" in size:  # Qwen: the pixel limits under the names 4.x reads
        image.setdefault("min_pixels", size["shortest_edge"])
        image.setdefault("max_pixels", size["longest_edge"])
    write_json(os.path.join(folder, "preprocessor_config.json"), image)
    if "video_processor" in config:
        write_json(os.path.join(folder, "video_preprocessor_config.json"), config.pop("video_processor"))
    config["processor_class"] = fam.processor_class
    if len(config) > 1:
        write_json(nested, config)
    else:
        os.remove(nested)
    tokenizer_path = os.path.join(folder, "tokenizer_config.json")
    with open(tokenizer_path) as f:
        tokenizer = json.load(f)
    if tokenizer.get("processor_class") == saved_as:
        tokenizer["processor_class"] = fam.processor_class
        write_json(tokenizer_path, tokenizer)
