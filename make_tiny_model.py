"""
make_tiny_model.py: build a tiny random-weight Qwen2.5-VL and save it as a normal model folder.

No machine here reaches a model hub, so CPU runs and tests use a model this script makes: the real
Qwen2.5-VL architecture (vision tower with window attention and patch merger, 3-D rotary text
model), a few hundred thousand parameters, random weights, and its own byte-level BPE tokenizer
trained on the game's prompts. It is saved with `save_pretrained` and loaded back by the same
`AutoModelForImageTextToText.from_pretrained` / `AutoProcessor.from_pretrained` calls that load
Qwen/Qwen2.5-VL-7B-Instruct, so everything downstream runs unchanged.

    python make_tiny_model.py --out tiny-vlm            # 0.2M parameters, builds in a second
    python make_tiny_model.py --out tiny-vlm --hidden 192 --layers 3 --heads 4
    python make_tiny_model.py --out vlm-7b-shape --shape 7b --layers 1 --vision-depth 2

Images cost 1-4 visual tokens at the tiny shape's --max-pixels (28*28 .. 56*56 pixels after resizing).

--shape 7b gives every layer Qwen2.5-VL-7B-Instruct's shape (text: hidden 3584, 28 heads, 4 kv
heads, MLP 18944, mrope [16, 24, 24]; vision: hidden 1280, 16 heads, MLP 3420, window 112, full
attention in blocks 7/15/23/31 where the depth has them) and the real processor's pixel limits
(3136 .. 12845056: a 480x320 picture is 187 visual tokens); --layers / --vision-depth cut the
depth (28 and 32 by default: the full 7B, 7.2B parameters, 14.4 GB in bfloat16). Only the
vocabulary stays the project's own 512-token BPE: the real 152064-token one changes the size of
the embedding and the output layer, not of a layer, and needs the real tokenizer. Timing and memory
do not depend on the weights' values, so such a model stands in for the real one in benchmarks.
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
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AddedToken, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2TokenizerFast

import cli
import selfplay

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
# Qwen2's pre-tokenizer: words, single digits, punctuation runs, whitespace
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# The same structure as Qwen2.5-VL's template, reduced to what the game sends: text and images
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif item['type'] == 'text' %}{{ item['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Words of clues and decisions, so that the tokenizer has them as single tokens
CLUE_WORDS = (
    "a an the is are there one two three four five six left right front back middle center top bottom "
    "large small big tiny shiny matte metal rubber metallic gray red blue green brown purple cyan yellow "
    "white black orange pink cube cubes sphere spheres ball cylinder cylinders square squares object objects block yes no Player Round Is "
    "bar bars line lines pie slice chart value values highest lowest tallest shortest year month "
    "quarter sales share percent photo person sky table cup tree car building I think player spy "
    "civilian clue vote because my picture shows see near next to behind beside of and with in on"
)


def train_tokenizer(vocab_size):
    """A byte-level BPE trained on the game's own prompts and clue words (Qwen2's split rules)."""
    corpus = [CLUE_WORDS] * 20
    for domain in selfplay.DOMAIN_RULES:
        for spy_image in ("modified", "blank"):
            corpus.append(selfplay.game_rules(4, domain, spy_image))
        corpus.append(selfplay.CLUE_FORMAT.format(example=selfplay.CLUE_EXAMPLES[domain]))
    corpus += [selfplay.CIVILIAN_TASK, selfplay.SPY_TASK, selfplay.JUDGE_TASK,
               selfplay.VOTER_TASK.format(seat=1), selfplay.VOTE_FORMAT,
               "Clues so far:\nRound 1: Player 1: \"\" Player 2: \"\"\nYour private notes from earlier rounds:\n"
               "This is round 1 of 2. All clues: (no clues yet) \\boxed{N/A} \\boxed{1}"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()  # without it decoding shows "Ġ" for spaces
    bpe.train_from_iterator(corpus * 5, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = Qwen2TokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    # special=True, normalized=False: otherwise transformers 5.x splits them into bytes
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS], special_tokens=True)
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
# in the last block); the 7b one is Qwen2.5-VL-7B-Instruct's config.json.
SHAPES = {
    "tiny": dict(hidden=64, layers=2, heads=4, vision_hidden=32, vision_depth=2, min_pixels=28 * 28,
                 max_pixels=56 * 56, init_range=0.06, dtype="float32"),
    "7b": dict(hidden=3584, layers=28, heads=28, kv_heads=4, intermediate=18944, max_positions=128000,
               vision_hidden=1280, vision_depth=32, vision_heads=16, vision_intermediate=3420, window=112,
               fullatt_blocks=[7, 15, 23, 31], min_pixels=3136, max_pixels=12845056,
               init_range=0.02, dtype="bfloat16"),
}


def resolve_shape(args):
    """args with every size filled in: the flags given, then --shape's values, then the tiny rules.
    Fields absent from args count as unset (callers may pass a Namespace of the original flags)."""
    shape = SHAPES[getattr(args, "shape", None) or "tiny"]
    given = {k: v for k, v in vars(args).items() if v is not None}
    r = argparse.Namespace(**{**shape, **given})
    r.shape = getattr(args, "shape", None) or "tiny"
    defaults = dict(kv_heads=max(1, r.heads // 2), intermediate=r.hidden * 3, max_positions=4096,
                    vision_heads=2, vision_intermediate=r.vision_hidden * 2, window=56,
                    fullatt_blocks=[r.vision_depth - 1], device="cpu")
    for name, value in defaults.items():
        if getattr(r, name, None) is None:
            setattr(r, name, value)
    r.fullatt_blocks = [b for b in r.fullatt_blocks if b < r.vision_depth]
    return r


def build(args):
    args = resolve_shape(args)
    Processor = selfplay.register_image_only_processor()
    try:  # transformers 5.x: the PIL image processor (the default one needs torchvision)
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil as ImageProcessor
    except ImportError:  # 4.x: the plain class is the PIL one
        from transformers import Qwen2VLImageProcessor as ImageProcessor
    tokenizer = train_tokenizer(args.vocab_size)
    image_processor = ImageProcessor(min_pixels=args.min_pixels, max_pixels=args.max_pixels,
                                     patch_size=14, merge_size=2, temporal_patch_size=2)
    processor = Processor(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)

    token = tokenizer.convert_tokens_to_ids
    head_dim = args.hidden // args.heads
    # mrope_section splits head_dim/2 rotary frequencies over (time, height, width), as 16:24:24 in the 7B
    t = head_dim // 2 // 4
    mrope = [t, (head_dim // 2 - t) // 2, head_dim // 2 - t - (head_dim // 2 - t) // 2]
    config = Qwen2_5_VLConfig(
        text_config=dict(
            hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
            num_key_value_heads=args.kv_heads, intermediate_size=args.intermediate,
            vocab_size=len(tokenizer), max_position_embeddings=args.max_positions, tie_word_embeddings=True,
            rope_scaling={"type": "mrope", "mrope_section": mrope}, initializer_range=args.init_range,
            bos_token_id=token("<|endoftext|>"), eos_token_id=token("<|im_end|>"), pad_token_id=token("<|endoftext|>")),
        vision_config=dict(
            depth=args.vision_depth, hidden_size=args.vision_hidden, num_heads=args.vision_heads,
            intermediate_size=args.vision_intermediate, out_hidden_size=args.hidden, patch_size=14,
            spatial_merge_size=2, temporal_patch_size=2, window_size=args.window,
            fullatt_block_indexes=args.fullatt_blocks, initializer_range=args.init_range),
        image_token_id=token("<|image_pad|>"), video_token_id=token("<|video_pad|>"),
        vision_start_token_id=token("<|vision_start|>"), vision_end_token_id=token("<|vision_end|>"),
        tie_word_embeddings=True, initializer_range=args.init_range, bos_token_id=token("<|endoftext|>"))
    torch.manual_seed(args.seed)
    with torch.device(args.device):
        model = Qwen2_5_VLForConditionalGeneration(config).to(getattr(torch, args.dtype))
    model.generation_config.eos_token_id = [token("<|im_end|>"), token("<|endoftext|>")]
    model.generation_config.pad_token_id = token("<|endoftext|>")

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
    print(f"{args.shape} Qwen2.5-VL: {n_params / 1e6:.2f}M parameters, vocabulary {len(tokenizer)}, saved to {args.out}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=cli.HelpFormatter)
    parser.add_argument("--out", default="tiny-vlm", help="folder to write the model, its tokenizer and processor to")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny",
                        help="layer shapes: tiny (0.2M parameters) or 7b (Qwen2.5-VL-7B's; cut depth with --layers/--vision-depth)")
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
    args = resolve_shape(parser.parse_args())
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a plain kill runs the cleanup in build()
    if args.hidden % (8 * args.heads) or args.heads % args.kv_heads or args.vision_hidden % (4 * args.vision_heads):
        parser.error("--hidden must be divisible by 8 * --heads, --heads by the kv heads and --vision-hidden by 4 * "
                     "the vision heads (rotary sections)")
    build(args)


if __name__ == "__main__":
    main()
