"""
make_tiny_model.py: build a tiny random-weight vision-language model of any supported family and
save it as a normal model folder.

No machine here reaches a model hub, so CPU runs and tests use a model this script makes: the real
architecture of the family (--family, models.py: qwen2_5_vl by default, qwen3_vl, internvl, gemma3,
smolvlm, llava_onevision), a few hundred thousand parameters, random weights, its own tokenizer
trained on the game's prompts (byte-level BPE; Gemma 3: a SentencePiece-style BPE with byte
fallback, which GemmaTokenizer needs) with the family's special tokens, and a chat template in the
family's structure. It is saved with `save_pretrained` and loaded back by the same
`AutoModelForImageTextToText` / `selfplay.load_processor` calls that load the released models, so
everything downstream runs unchanged.

    python make_tiny_model.py --out tiny-vlm            # Qwen2.5-VL, 0.2M parameters, builds in a second
    python make_tiny_model.py --out tiny-gemma --family gemma3
    python make_tiny_model.py --out tiny-vlm --hidden 192 --layers 3 --heads 4
    python make_tiny_model.py --out vlm-7b-shape --shape 7b --layers 1 --vision-depth 2
    python make_tiny_model.py --out qwen3-8b-shape --shape qwen3-vl-8b --layers 1 --vision-depth 1

Images cost 1-20 visual tokens at the tiny shape (Qwen: --max-pixels 56*56; the others: 56-px tiles).

--shape 7b gives every layer Qwen2.5-VL-7B-Instruct's shape (text: hidden 3584, 28 heads, 4 kv
heads, MLP 18944, mrope [16, 24, 24]; vision: hidden 1280, 16 heads, MLP 3420, window 112, full
attention in blocks 7/15/23/31 where the depth has them) and the real processor's pixel limits
(3136 .. 12845056: a 480x320 picture is 187 visual tokens); --layers / --vision-depth cut the
depth (28 and 32 by default: the full 7B, 7.2B parameters, 14.4 GB in bfloat16). --shape
qwen3-vl-8b (text 4096, 36 layers, 32 heads, 8 kv, MLP 12288; vision 1152, 27 layers, patch 16,
deepstack 8/16/24) and --shape internvl3-8b (text as Qwen2.5-7B; InternViT-300M: 1024, 24 layers,
448-px tiles) do the same for those models. Only the vocabulary stays the project's own 512-token
BPE: the real one changes the size of the embedding and the output layer, not of a layer, and
needs the real tokenizer. Timing and memory do not depend on the weights' values, so such a model
stands in for the real one in benchmarks.
"""
import argparse
import json
import os
import re
import shutil
import signal
import sys
import tempfile

import torch
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, trainers
from tokenizers.models import BPE
from transformers import AddedToken, AutoModelForImageTextToText, GemmaTokenizer, Qwen2TokenizerFast

import cli
import models
import selfplay

# Qwen2's pre-tokenizer: words, single digits, punctuation runs, whitespace
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def chat_template(turn_start, turn_end, image, roles=None):
    """A chat template in a family's structure, reduced to what the game sends: text and images.
    turn_start is formatted with the role, roles renames them (Gemma's assistant is "model")."""
    role = "{{ message['role'] }}" if roles is None else \
        "{{ " + repr(roles) + ".get(message['role'], message['role']) }}"
    assistant = turn_start.replace("{role}", (roles or {}).get("assistant", "assistant"))
    return ("{% for message in messages %}" + turn_start.replace("{role}", role)
            + "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
            "{% for item in message['content'] %}{% if item['type'] == 'image' %}" + image
            + "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
            + turn_end + "{% endfor %}{% if add_generation_prompt %}" + assistant + "{% endif %}")


QWEN_TEMPLATE = chat_template("<|im_start|>{role}\n", "<|im_end|>\n", "<|vision_start|><|image_pad|><|vision_end|>")
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
# Words of clues and decisions, so that the tokenizer has them as single tokens
CLUE_WORDS = (
    "a an the is are there one two three four five six left right front back middle center top bottom "
    "large small big tiny shiny matte metal rubber metallic gray red blue green brown purple cyan yellow "
    "white black orange pink cube cubes sphere spheres ball cylinder cylinders square squares object objects block yes no Player Round Is "
    "bar bars line lines pie slice chart value values highest lowest tallest shortest year month "
    "quarter sales share percent photo person sky table cup tree car building I think player spy "
    "civilian clue vote because my picture shows see near next to behind beside of and with in on"
)


def corpus():
    """The game's own prompts and clue words: the text every tokenizer here is trained on."""
    texts = [CLUE_WORDS] * 20
    for domain in selfplay.DOMAIN_RULES:
        for spy_image in ("modified", "blank"):
            texts.append(selfplay.game_rules(4, domain, spy_image))
        texts.append(selfplay.CLUE_FORMAT.format(example=selfplay.CLUE_EXAMPLES[domain]))
    texts += [selfplay.CIVILIAN_TASK, selfplay.SPY_TASK, selfplay.JUDGE_TASK,
              selfplay.VOTER_TASK.format(seat=1), selfplay.VOTE_FORMAT,
              "Clues so far:\nRound 1: Player 1: \"\" Player 2: \"\"\nYour private notes from earlier rounds:\n"
              "This is round 1 of 2. All clues: (no clues yet) \\boxed{N/A} \\boxed{1}"]
    return texts * 5


def byte_level_tokenizer(vocab_size, specials, eos, pad, named=None):
    """A byte-level BPE (Qwen2's split rules), as Qwen, InternVL, LLaVA-OneVision and SmolVLM use.
    named: special tokens the processor reads as tokenizer attributes (InternVL's
    context_image_token, ...)."""
    bpe = Tokenizer(BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()  # without it decoding shows "Ġ" for spaces
    bpe.train_from_iterator(corpus(), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = Qwen2TokenizerFast(tokenizer_object=bpe, eos_token=eos, pad_token=pad, extra_special_tokens=named or {})
    # special=True, normalized=False: otherwise transformers 5.x splits them into bytes
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in specials], special_tokens=True)
    return tokenizer


def sentencepiece_tokenizer(vocab_size, specials, named):
    """A SentencePiece-style BPE ("▁" for spaces, byte fallback), which GemmaTokenizer needs: it
    rebuilds its pipeline from the vocabulary and merges alone. The first ids are the special
    tokens, then the 256 byte tokens <0x00>..<0xFF>, then the merges learnt on the game's text."""
    bpe = Tokenizer(BPE())
    bpe.normalizer = normalizers.Replace(" ", "▁")
    bpe.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    bpe.train_from_iterator(corpus(), trainers.BpeTrainer(vocab_size=vocab_size - len(specials) - 256,
                                                          show_progress=False))
    learnt = json.loads(bpe.to_str())["model"]
    vocab = {t: i for i, t in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)])}
    for token in sorted(learnt["vocab"], key=learnt["vocab"].get):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m.split(" ") if isinstance(m, str) else m) for m in learnt["merges"]]
    tokenizer = GemmaTokenizer(vocab=vocab, merges=merges, extra_special_tokens=named)
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in specials], special_tokens=True)
    return tokenizer


def remove_stale_staging(parent):
    """Delete the .tiny-<pid>-* staging folders in `parent` whose process is gone (killed builds)."""
    for name in os.listdir(parent):
        m = re.fullmatch(r"\.tiny-(\d+)-\w+", name)
        if m is None:
            continue
        try:
            os.kill(int(m.group(1)), 0)  # signal 0: only asks whether the process exists
            continue
        except ProcessLookupError:
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
        except (PermissionError, OverflowError):  # another user's live process, or no such pid
            continue


# Each shape's values for the flags left unset. The tiny shape derives the rest from its sizes
# (kv heads half the heads, MLP 3x hidden, 2 vision heads, vision MLP 2x, window 56, full attention
# in the last block); the others are the config.json of the released model named, and set the family.
SHAPES = {
    "tiny": dict(hidden=64, layers=2, heads=4, vision_hidden=32, vision_depth=2, min_pixels=28 * 28,
                 max_pixels=56 * 56, tile=56, init_range=0.06, dtype="float32"),
    "7b": dict(family="qwen2_5_vl", hidden=3584, layers=28, heads=28, kv_heads=4, intermediate=18944,
               max_positions=128000, vision_hidden=1280, vision_depth=32, vision_heads=16, vision_intermediate=3420,
               window=112, fullatt_blocks=[7, 15, 23, 31], min_pixels=3136, max_pixels=12845056,
               init_range=0.02, dtype="bfloat16"),
    "qwen3-vl-8b": dict(family="qwen3_vl", hidden=4096, layers=36, heads=32, kv_heads=8, intermediate=12288,
                        max_positions=262144, vision_hidden=1152, vision_depth=27, vision_heads=16,
                        vision_intermediate=4304, deepstack=[8, 16, 24], min_pixels=65536, max_pixels=16777216,
                        init_range=0.02, dtype="bfloat16"),
    "internvl3-8b": dict(family="internvl", hidden=3584, layers=28, heads=28, kv_heads=4, intermediate=18944,
                         max_positions=32768, vision_hidden=1024, vision_depth=24, vision_heads=16,
                         vision_intermediate=4096, tile=448, max_tiles=12, init_range=0.02, dtype="bfloat16"),
}


def resolve_shape(args):
    """args with every size filled in: the flags given, then --shape's values, then the tiny rules.
    Fields absent from args count as unset (callers may pass a Namespace of the original flags)."""
    shape = SHAPES[getattr(args, "shape", None) or "tiny"]
    given = {k: v for k, v in vars(args).items() if v is not None}
    r = argparse.Namespace(**{**shape, **given})
    r.shape = getattr(args, "shape", None) or "tiny"
    defaults = dict(family="qwen2_5_vl", kv_heads=max(1, r.heads // 2), intermediate=r.hidden * 3, max_positions=4096,
                    vision_heads=2, vision_intermediate=r.vision_hidden * 2, window=56,
                    fullatt_blocks=[r.vision_depth - 1], deepstack=[0], tile=56, max_tiles=2, device="cpu")
    for name, value in defaults.items():
        if getattr(r, name, None) is None:
            setattr(r, name, value)
    r.fullatt_blocks = [b for b in r.fullatt_blocks if b < r.vision_depth]
    r.deepstack = [b for b in r.deepstack if b < r.vision_depth]
    return r


def text_config(args, tokenizer, model_type, **extra):
    """The text model's sizes, as every family's text config names them."""
    return dict(model_type=model_type, hidden_size=args.hidden, num_hidden_layers=args.layers,
                num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, head_dim=args.hidden // args.heads,
                intermediate_size=args.intermediate, vocab_size=len(tokenizer), max_position_embeddings=args.max_positions,
                initializer_range=args.init_range, tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id, **extra)


def vision_config(args, model_type, **extra):
    """A ViT tower's sizes under the names of SigLIP, InternViT and SmolVLM's tower."""
    return dict(model_type=model_type, hidden_size=args.vision_hidden, num_hidden_layers=args.vision_depth,
                num_attention_heads=args.vision_heads, intermediate_size=args.vision_intermediate,
                initializer_range=args.init_range, **extra)


def mrope_sections(head_dim, first_share):
    """(time, height, width) rotary frequencies over head_dim / 2: the time share first, the rest
    split in two (16:24:24 in Qwen2.5-VL-7B, 24:20:20 in Qwen3-VL-8B)."""
    half = head_dim // 2
    t = max(1, round(half * first_share))
    return [t, (half - t) // 2, half - t - (half - t) // 2]


def qwen2_5_vl(args):
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    tokenizer = byte_level_tokenizer(args.vocab_size, QWEN_SPECIALS, "<|im_end|>", "<|endoftext|>")
    image_processor = Qwen2VLImageProcessorPil(min_pixels=args.min_pixels, max_pixels=args.max_pixels,
                                               patch_size=14, merge_size=2, temporal_patch_size=2)
    token = tokenizer.convert_tokens_to_ids
    text = text_config(args, tokenizer, "qwen2_5_vl_text", bos_token_id=token("<|endoftext|>"), eos_token_id=token("<|im_end|>"),
                       rope_scaling={"type": "mrope", "mrope_section": mrope_sections(args.hidden // args.heads, 1 / 4)})
    del text["head_dim"]
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=dict(
            depth=args.vision_depth, hidden_size=args.vision_hidden, num_heads=args.vision_heads,
            intermediate_size=args.vision_intermediate, out_hidden_size=args.hidden, patch_size=14,
            spatial_merge_size=2, temporal_patch_size=2, window_size=args.window,
            fullatt_block_indexes=args.fullatt_blocks, initializer_range=args.init_range),
        image_token_id=token("<|image_pad|>"), video_token_id=token("<|video_pad|>"),
        vision_start_token_id=token("<|vision_start|>"), vision_end_token_id=token("<|vision_end|>"),
        tie_word_embeddings=True, initializer_range=args.init_range, bos_token_id=token("<|endoftext|>"))
    return config, dict(image_processor=image_processor, tokenizer=tokenizer, chat_template=QWEN_TEMPLATE)


def qwen3_vl(args):
    from transformers import Qwen3VLConfig
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    tokenizer = byte_level_tokenizer(args.vocab_size, QWEN_SPECIALS, "<|im_end|>", "<|endoftext|>")
    # patch 16, merge 2: one visual token per 32x32 pixels
    image_processor = Qwen2VLImageProcessorPil(min_pixels=args.min_pixels, max_pixels=args.max_pixels,
                                               patch_size=16, merge_size=2, temporal_patch_size=2)
    token = tokenizer.convert_tokens_to_ids
    rope = {"rope_type": "default", "rope_theta": 5000000.0, "mrope_interleaved": True,
            "mrope_section": mrope_sections(args.hidden // args.heads, 24 / 64)}
    config = Qwen3VLConfig(
        text_config=text_config(args, tokenizer, "qwen3_vl_text", rope_parameters=rope),
        vision_config=dict(depth=args.vision_depth, hidden_size=args.vision_hidden, num_heads=args.vision_heads,
                           intermediate_size=args.vision_intermediate, out_hidden_size=args.hidden, patch_size=16,
                           spatial_merge_size=2, temporal_patch_size=2, deepstack_visual_indexes=args.deepstack,
                           num_position_embeddings=2304,
                           initializer_range=args.init_range),
        image_token_id=token("<|image_pad|>"), video_token_id=token("<|video_pad|>"),
        vision_start_token_id=token("<|vision_start|>"), vision_end_token_id=token("<|vision_end|>"),
        tie_word_embeddings=True)
    return config, dict(image_processor=image_processor, tokenizer=tokenizer, chat_template=QWEN_TEMPLATE)


def internvl(args):
    from transformers import InternVLConfig
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
    named = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
             "video_token": "<video>"}
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *named.values()]
    tokenizer = byte_level_tokenizer(args.vocab_size, specials, "<|im_end|>", "<|endoftext|>", named)
    # 14-px patches, pixel shuffle 0.5: a tile of `tile` pixels is (tile / 28)^2 tokens (448: 256)
    image_processor = GotOcr2ImageProcessorPil(size={"height": args.tile, "width": args.tile}, crop_to_patches=True,
                                               min_patches=1, max_patches=args.max_tiles)
    config = InternVLConfig(
        text_config=text_config(args, tokenizer, "qwen2"),
        vision_config=vision_config(args, "internvl_vision", image_size=[args.tile] * 2, patch_size=[14, 14]),
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"), image_seq_length=(args.tile // 28) ** 2)
    return config, dict(image_processor=image_processor, tokenizer=tokenizer, image_seq_length=(args.tile // 28) ** 2,
                        chat_template=chat_template("<|im_start|>{role}\n", "<|im_end|>\n", "<IMG_CONTEXT>\n"))


def gemma3(args):
    from transformers import Gemma3Config
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
    named = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>", *named.values()]
    tokenizer = sentencepiece_tokenizer(args.vocab_size, specials, named)
    token = tokenizer.convert_tokens_to_ids
    tokens_per_image = 4  # pooled from the tile's 14-px patches
    config = Gemma3Config(
        text_config=text_config(args, tokenizer, "gemma3_text", sliding_window=64, query_pre_attn_scalar=args.hidden // args.heads,
                                bos_token_id=token("<bos>"), eos_token_id=token("<eos>")),
        vision_config=vision_config(args, "siglip_vision_model", image_size=args.tile, patch_size=14),
        mm_tokens_per_image=tokens_per_image, boi_token_index=token("<start_of_image>"),
        eoi_token_index=token("<end_of_image>"), image_token_index=token("<image_soft_token>"),
        initializer_range=args.init_range)
    return config, dict(image_processor=Gemma3ImageProcessorPil(size={"height": args.tile, "width": args.tile}),
                        tokenizer=tokenizer, image_seq_length=tokens_per_image,
                        chat_template="{{ bos_token }}" + chat_template("<start_of_turn>{role}\n", "<end_of_turn>\n",
                                                                        "<start_of_image>", roles={"assistant": "model"}))


def smolvlm(args):
    from transformers import SmolVLMConfig
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil
    grid = [f"<row_{r}_col_{c}>" for r in range(1, 5) for c in range(1, 5)]
    specials = ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>",
                "<global-img>", "<video>", *grid]
    tokenizer = byte_level_tokenizer(args.vocab_size, specials, "<end_of_utterance>", "<|endoftext|>")
    # tiles of `tile` pixels (14-px patches, 2x2 shuffled into one token) and a global view
    image_processor = SmolVLMImageProcessorPil(size={"longest_edge": 2 * args.tile}, max_image_size={"longest_edge": args.tile},
                                               do_image_splitting=True)
    tokens_per_tile = (args.tile // 28) ** 2
    config = SmolVLMConfig(
        text_config=text_config(args, tokenizer, "llama", eos_token_id=tokenizer.convert_tokens_to_ids("<end_of_utterance>")),
        vision_config=vision_config(args, "smolvlm_vision", image_size=args.tile, patch_size=14),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), scale_factor=2, tie_word_embeddings=True)
    return config, dict(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=tokens_per_tile,
                        chat_template="<|im_start|>" + chat_template("{role}:", "<end_of_utterance>\n", "<image>",
                                                                     roles={"user": "User", "assistant": "Assistant"}))


def llava_onevision(args):
    from transformers import LlavaOnevisionConfig
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
    tokenizer = byte_level_tokenizer(args.vocab_size, specials, "<|im_end|>", "<|endoftext|>")
    tile, patch = args.tile, args.tile // 2  # 4 tokens per tile; "anyres": the picture in up to 2x2 tiles and whole
    pinpoints = [[tile * h, tile * w] for h in (1, 2) for w in (1, 2)]
    image_processor = LlavaOnevisionImageProcessorPil(size={"height": tile, "width": tile}, image_grid_pinpoints=pinpoints)
    config = LlavaOnevisionConfig(
        text_config=text_config(args, tokenizer, "qwen2"),
        vision_config=vision_config(args, "siglip_vision_model", image_size=tile, patch_size=patch),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=pinpoints, vision_feature_select_strategy="full", tie_word_embeddings=True)
    return config, dict(image_processor=image_processor, tokenizer=tokenizer, num_image_tokens=(tile // patch) ** 2,
                        vision_feature_select_strategy="full",
                        chat_template=chat_template("<|im_start|>{role}\n", "<|im_end|>\n", "<image>\n"))


BUILDERS = {f.__name__: f for f in (qwen2_5_vl, qwen3_vl, internvl, gemma3, smolvlm, llava_onevision)}


def processor_class(model_type):
    """The class that builds a family's processor here: the stock one, or its image-only stand-in
    when the stock one needs torchvision's video processor."""
    import transformers
    fam = models.family(model_type)
    if fam.needs_video_processor:
        return models.register_image_only_processors()[model_type]
    return getattr(transformers, fam.processor_class)


def build(args):
    args = resolve_shape(args)
    config, parts = BUILDERS[args.family](args)
    processor = processor_class(args.family)(**parts)
    tokenizer = processor.tokenizer
    torch.manual_seed(args.seed)
    with torch.device(args.device):
        model = AutoModelForImageTextToText.from_config(config).to(getattr(torch, args.dtype))
    # a turn ends at the family's stop token, or at the end or padding token a random model samples
    stops = [tokenizer.convert_tokens_to_ids(models.family(args.family).stop_token), tokenizer.eos_token_id,
             tokenizer.pad_token_id]
    model.generation_config.eos_token_id = list(dict.fromkeys(stops))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id

    # write next to the target and rename: a half-written model folder never exists, and the
    # staging folder goes whatever stops the build (the one of a kill -9 goes at the next build)
    parent = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(parent, exist_ok=True)
    remove_stale_staging(parent)
    staging = tempfile.mkdtemp(dir=parent, prefix=f".tiny-{os.getpid()}-")
    try:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        with open(os.path.join(staging, "tiny_model_args.json"), "w") as f:
            json.dump(vars(args), f, indent=1)
        if os.path.exists(args.out):
            shutil.rmtree(args.out)
        os.replace(staging, args.out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already when the rename happened
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.shape} {models.family(args.family).name}: {n_params / 1e6:.2f}M parameters, vocabulary {len(tokenizer)}, "
          f"saved to {args.out}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=cli.HelpFormatter)
    parser.add_argument("--out", default="tiny-vlm", help="folder to write the model, its tokenizer and processor to")
    parser.add_argument("--family", choices=sorted(BUILDERS),
                        help="model family (config.model_type) of the model: default qwen2_5_vl, or the --shape's")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny",
                        help="layer shapes: tiny (0.2M parameters), or a released model's (7b: Qwen2.5-VL-7B, "
                             "qwen3-vl-8b, internvl3-8b; cut depth with --layers/--vision-depth)")
    parser.add_argument("--hidden", type=int, help="text hidden size, divisible by 8 * heads (tiny: 64)")
    parser.add_argument("--layers", type=int, help="text decoder layers (tiny: 2, 7b: 28)")
    parser.add_argument("--heads", type=int, help="text attention heads (tiny: 4 with 2 kv heads, 7b: 28 with 4)")
    parser.add_argument("--vision-hidden", type=int, help="vision tower width (tiny: 32, 7b: 1280)")
    parser.add_argument("--vision-depth", type=int, help="vision tower blocks (tiny: 2, the last with full attention; 7b: 32)")
    parser.add_argument("--vocab-size", type=int, default=512, help="tokenizer vocabulary size, special tokens included")
    parser.add_argument("--min-pixels", type=int, help="images are resized to at least this many pixels (tiny: 28*28, 7b: 3136)")
    parser.add_argument("--max-pixels", type=int, help="and at most this many (tiny: 56*56 = 4 visual tokens, 7b: 12845056)")
    parser.add_argument("--init-range", type=float,
                        help="weight init std (tiny: 0.06, as 0.02 leaves a tiny model image-blind for minutes; 7b: 0.02)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], help="dtype of the saved weights (tiny: float32, 7b: bfloat16)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--device", default="cpu",
                        help="where the weights are drawn: cuda makes the full 7b shape in seconds, not minutes (other values then)")
    given = parser.parse_args()
    shape_family = SHAPES[given.shape].get("family")
    if given.family and shape_family and given.family != shape_family:
        parser.error(f"--shape {given.shape} is a {shape_family} model; leave out --family or choose --shape tiny")
    args = resolve_shape(given)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a plain kill runs the cleanup in build()
    if args.hidden % (8 * args.heads) or args.heads % args.kv_heads or args.vision_hidden % (4 * args.vision_heads):
        parser.error("--hidden must be divisible by 8 * --heads, --heads by the kv heads and --vision-hidden by 4 * "
                     "the vision heads (rotary sections)")
    build(args)


if __name__ == "__main__":
    main()
