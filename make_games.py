"""
Make "Who is the spy?" image pairs for Vision-Zero: an original image (seen by the
civilians) and a subtly edited copy (seen by the spy), plus what was changed and where.

Three domains:
  clevr  CLEVR-like 3-D scenes from a numpy ray caster (clevr_render.py); k objects change colour AND shape
  chart  bar / line / pie charts drawn with matplotlib; two values are swapped
  photo  your own photos with local edits (recolour, remove, duplicate, mirror a region),
         or ready-made pairs imported from a folder
  cells  flat squares in the cells of a 4x4 grid of 28 px, k squares change colour: a domain a
         tiny CPU model can perceive (one square per visual token); not for real models

Output layout (the same for every domain; an existing DIR is reused and files with the
same names are overwritten):
  DIR/images/<id>_original.png
  DIR/images/<id>_modified.png
  DIR/pairs.jsonl   one JSON object per pair:
    {"id": "000000", "domain": "clevr",
     "original": "images/000000_original.png", "modified": "images/000000_modified.png",
     "width": 480, "height": 320, "source": {...},
     "changes": [{"what": ..., "before": ..., "after": ..., "bbox": [x0, y0, x1, y1]}]}
  Paths are relative to DIR, bboxes are pixels of the saved images with x1/y1 exclusive.

Commands:
  python make_games.py --domain clevr --n 2000 --out games/clevr
  python make_games.py --domain chart --n 2000 --out games/chart
  python make_games.py --domain cells --n 2000 --out games/cells
  python make_games.py --domain photo --src my_photos/ --n 500 --out games/photo
  python make_games.py --domain photo --pairs released_pairs/ --out games/imported

Every pair is checked before it is written: same size, really different, and local (between
--min-change and --max-change of the pixels change). Synthetic pairs that fail are drawn again;
photos and imported pairs that fail are skipped with the reason. The same --seed and flags give
byte-identical output for any --workers. The last line printed is a summary with pairs/s.
"""

import argparse
import json
import math
import os
import re
import signal
import sys
import time
from collections import Counter
from multiprocessing import Pool

import matplotlib
import numpy as np
from PIL import Image, ImageOps
from tqdm import tqdm

import cli
from clevr_render import CLEVR_COLOURS, CLEVR_SHAPES, box_blur, object_geometry, render_clevr, sample_scene

matplotlib.use("Agg")  # draw off-screen, the same on every machine
import matplotlib.pyplot as plt  # noqa: E402  (must come after choosing the backend)

PROG = "make_games.py"
MIN_SIDE = 64  # photos smaller than this on either side are too small for a local edit


class PairSkipped(Exception):
    """A pair that cannot be made: a short reason for the summary and a detailed one-line message."""

    def __init__(self, reason, detail):
        super().__init__(reason, detail)  # both in self.args, so it pickles back from a worker process
        self.reason, self.detail = reason, detail


def die(message):
    print(f"{PROG}: error: {message}", file=sys.stderr)
    sys.exit(2)


def save_png(array, path):
    # PIL writes no timestamp or other metadata, so the same pixels give the same bytes
    Image.fromarray(array).save(path, compress_level=3)


def changed_mask(a, b, threshold):
    """Pixels whose largest channel difference exceeds threshold (0..255)."""
    return np.abs(a.astype(np.int16) - b.astype(np.int16)).max(axis=2) > threshold


def mask_bbox(mask):
    """[x0, y0, x1, y1] (exclusive) of the True pixels of mask, or None if there are none."""
    ys, xs = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    if len(ys) == 0:
        return None
    return [int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1]


def check_pair(original, modified, args):
    """None if the pair is usable, else the reason it is not."""
    if original.shape != modified.shape:
        return "original and modified differ in size"
    fraction = changed_mask(original, modified, args.pixel_threshold).mean()
    if fraction == 0:
        return "no visible difference"
    if fraction < args.min_change:
        return f"difference too small ({fraction:.2%} of pixels < --min-change {args.min_change:.2%})"
    if fraction > args.max_change:
        return f"difference not local ({fraction:.2%} of pixels > --max-change {args.max_change:.2%})"
    return None


# -----------------------------------------------------------------------------
# clevr: scenes from clevr_render.py; k objects change colour AND shape


def clevr_object_record(o, ids, index):
    """An object as it goes in pairs.jsonl: attributes, 3-D position, visible pixels and their bbox."""
    _, half = object_geometry(o)
    return {"shape": o["shape"], "colour": o["colour"], "material": o["material"], "size": o["size"],
            "position": [o["x"], o["y"], half], "rotation_deg": math.degrees(o["angle"]),
            "pixels": int((ids == index).sum()), "bbox": mask_bbox(ids == index)}


def make_clevr_pair(rng, index, args):
    """A scene and a copy in which args.changes objects have a new colour AND a new shape."""
    width, height = args.size
    reason = "no scene sampled"
    for _ in range(args.tries):
        scene = sample_scene(rng, int(rng.integers(args.min_objects, args.max_objects + 1)))
        if scene is None:
            reason = "objects do not fit on the ground without touching"
            continue
        original, ids = render_clevr(scene, width, height)
        visible = np.bincount(ids.ravel() + 2, minlength=len(scene["objects"]) + 2)[2:]
        if visible.min() < args.min_visible:  # like CLEVR, every object must be visible
            reason = f"an object has fewer than --min-visible {args.min_visible} visible pixels"
            continue
        edited = {"objects": [dict(o) for o in scene["objects"]], "camera": scene["camera"], "lights": scene["lights"]}
        changed = sorted(int(i) for i in rng.choice(len(scene["objects"]), args.changes, replace=False))
        for i in changed:
            o = edited["objects"][i]
            o["colour"] = str(rng.choice([c for c in CLEVR_COLOURS if c != o["colour"]]))
            o["shape"] = str(rng.choice([s for s in CLEVR_SHAPES if s != o["shape"]]))
        modified, edited_ids = render_clevr(edited, width, height)
        if min((edited_ids == i).sum() for i in changed) < args.min_visible:
            reason = "a changed object became hidden"
            continue
        reason = check_pair(original, modified, args)
        if reason:
            continue
        source = {"objects": [clevr_object_record(o, ids, i) for i, o in enumerate(scene["objects"])],
                  "camera": scene["camera"], "lights": scene["lights"]}
        changes = [{"what": f"object {i}", "before": source["objects"][i],
                    "after": clevr_object_record(edited["objects"][i], edited_ids, i),
                    "bbox": mask_bbox((ids == i) | (edited_ids == i))} for i in changed]
        return original, modified, source, changes
    raise PairSkipped("no valid scene", f"no valid scene in --tries {args.tries} ({reason})")


# -----------------------------------------------------------------------------
# cells: flat squares on a grid whose cells line up with a tiny VLM's visual tokens

CELL_COLOURS = {  # far apart in RGB, so that a tiny vision tower tells them apart in minutes
    "red": (220, 30, 30), "green": (30, 170, 40), "blue": (40, 70, 230), "yellow": (240, 220, 30),
    "cyan": (40, 210, 220), "purple": (140, 40, 190), "gray": (128, 128, 128), "brown": (130, 75, 20),
}
CELL_SIZE = 28  # Qwen2.5-VL: patch 14, merge 2 -> one visual token per 28x28 cell
CELL_MARGIN = 4  # background around each square, so that neighbours never touch


def make_cells_pair(rng, index, args):
    """Squares of different colours in random cells of a grid (one square per visual token of a
    Qwen2.5-VL at 112x112); the copy gives args.changes of them a colour the scene does not have."""
    width, height = args.size
    columns, rows = width // CELL_SIZE, height // CELL_SIZE
    n_objects = int(rng.integers(args.min_objects, args.max_objects + 1))
    if n_objects + args.changes > len(CELL_COLOURS) or n_objects > columns * rows:
        raise PairSkipped("too many objects", f"{n_objects} objects + {args.changes} changes do not fit "
                          f"{len(CELL_COLOURS)} colours and {columns}x{rows} cells")
    names = list(CELL_COLOURS)
    palette = [names[i] for i in rng.permutation(len(names))]
    colours, unused = palette[:n_objects], palette[n_objects:]  # every object its own colour
    cells = sorted(int(c) for c in rng.choice(columns * rows, n_objects, replace=False))
    changed = sorted(int(i) for i in rng.choice(n_objects, args.changes, replace=False))
    new_colours = dict(zip(changed, unused))  # a colour the original lacks: a clue naming it is false

    def draw(colour_of):
        image = np.full((height, width, 3), 255, np.uint8)
        for i, cell in enumerate(cells):
            row, column = divmod(cell, columns)
            y, x = row * CELL_SIZE + CELL_MARGIN, column * CELL_SIZE + CELL_MARGIN
            image[y:y + CELL_SIZE - 2 * CELL_MARGIN, x:x + CELL_SIZE - 2 * CELL_MARGIN] = CELL_COLOURS[colour_of(i)]
        return image

    def record(i, colour):
        row, column = divmod(cells[i], columns)
        x0, y0 = column * CELL_SIZE + CELL_MARGIN, row * CELL_SIZE + CELL_MARGIN
        return {"shape": "square", "colour": colour, "cell": [row, column],
                "bbox": [x0, y0, x0 + CELL_SIZE - 2 * CELL_MARGIN, y0 + CELL_SIZE - 2 * CELL_MARGIN]}

    original = draw(lambda i: colours[i])
    modified = draw(lambda i: new_colours.get(i, colours[i]))
    reason = check_pair(original, modified, args)
    if reason:
        raise PairSkipped("bad pair", reason)
    source = {"grid": [rows, columns], "objects": [record(i, c) for i, c in enumerate(colours)]}
    changes = [{"what": f"object {i}", "before": record(i, colours[i]), "after": record(i, new_colours[i]),
                "bbox": record(i, colours[i])["bbox"]} for i in changed]
    return original, modified, source, changes


def colours_named(text):
    """The cells colours a text names as whole words ("a red square" -> {"red"}; "reddish" -> none)."""
    return {c for c in CELL_COLOURS if re.search(rf"\b{c}\b", text or "")}


def cells_colours(pair):
    """Colours of the squares in the original and in the modified picture of a cells pair, from its
    pairs.jsonl record."""
    original = [o["colour"] for o in pair["source"]["objects"]]
    modified = list(original)
    for change in pair["changes"]:
        modified[int(change["what"].split()[-1])] = change["after"]["colour"]
    return original, modified


# -----------------------------------------------------------------------------
# chart: matplotlib bar / grouped bar / line / pie charts; two values swap places

MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
CITIES = ["Oslo", "Madrid", "Cairo", "Tokyo", "Lima", "Sydney", "Toronto"]
CHART_THEMES = [  # title for several series, title for one, x label, y label, categories, series, value range, decimals
    ("Fruit sales by quarter", "{} sales by quarter", "Quarter", "Sales (tonnes)",
     ["Q1", "Q2", "Q3", "Q4"], ["Apples", "Bananas", "Cherries", "Grapes", "Oranges"], (20, 200), 0),
    ("Average temperature by month", "Average temperature in {}", "Month", "Temperature (°C)",
     MONTHS, CITIES, (-5, 35), 1),
    ("Rainfall by month", "Rainfall in {}", "Month", "Rainfall (mm)", MONTHS, CITIES, (0, 200), 0),
    ("Market share by brand", "Market share in {}", "Brand", "Share (%)",
     ["Acme", "Globex", "Initech", "Umbrella", "Hooli", "Vandelay", "Soylent"], ["Europe", "Asia", "America"],
     (5, 40), 1),
    ("Website visitors by weekday", "Visitors to the {} by weekday", "Day", "Visitors (thousands)",
     ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"], ["news site", "shop", "blog"], (5, 120), 0),
    ("Electricity generation by year", "{} generation by year", "Year", "Generation (TWh)",
     ["2017", "2018", "2019", "2020", "2021", "2022", "2023"], ["Solar", "Wind", "Hydro", "Gas"], (10, 300), 0),
    ("Books sold by genre", "Books sold by genre: {}", "Genre", "Copies sold",
     ["Crime", "Fantasy", "History", "Poetry", "Romance", "Science", "Travel"], ["Downtown", "Airport", "Online"],
     (100, 2000), 0),
    ("Students by major", "Students by major in {}", "Major", "Students",
     ["Biology", "Chemistry", "Economics", "Law", "Math", "Physics"], ["2021", "2022", "2023"], (40, 400), 0),
]
CHART_KINDS = ("bar", "grouped bar", "line", "pie")
CHART_PALETTES = ("tab10", "Set1", "Set2", "Dark2")  # matplotlib colour maps
_figure = None  # one matplotlib figure per process, cleared and reused for every chart (much faster)


def sample_chart(rng):
    """A random chart: kind, labels and a data table {series: [values per category]}."""
    many_title, one_title, x_label, y_label, categories, series, (low, high), decimals = \
        CHART_THEMES[rng.integers(len(CHART_THEMES))]
    kind = str(rng.choice(CHART_KINDS if low >= 0 else CHART_KINDS[:3]))  # a pie needs positive values
    n_categories = int(rng.integers(4, min(7, len(categories)) + 1))
    start = int(rng.integers(len(categories) - n_categories + 1))
    n_series = {"bar": 1, "pie": 1, "grouped bar": int(rng.integers(2, 4)), "line": int(rng.integers(1, 4))}[kind]
    names = [str(s) for s in rng.choice(series, n_series, replace=False)]
    values = rng.uniform(low, high, (n_series, n_categories))
    table = {name: [round(float(v), decimals) if decimals else int(round(v)) for v in row]
             for name, row in zip(names, values)}
    return {"kind": kind, "title": many_title if n_series > 1 else one_title.format(names[0]),
            "x_label": x_label, "y_label": y_label, "categories": categories[start:start + n_categories],
            "series": table, "value_range": [low, high], "palette": str(rng.choice(CHART_PALETTES))}


def draw_chart(chart, width, height, elements):
    """Draw a chart; return the RGB image and, per element (series, category index), its pixel box."""
    global _figure
    if _figure is None:
        plt.rcParams.update({"font.family": "DejaVu Sans", "font.size": 8})  # ships with matplotlib
        _figure = plt.figure(dpi=100)
    fig = _figure
    fig.clf()
    fig.set_size_inches(width / 100, height / 100)
    ax = fig.add_subplot()
    ax.set_prop_cycle(color=plt.get_cmap(chart["palette"]).colors)
    categories, table, kind = chart["categories"], chart["series"], chart["kind"]
    artists = {}  # (series, category index) -> artists whose pixels show that value
    x = np.arange(len(categories))
    if kind == "pie":
        name = next(iter(table))
        wedges, texts, autotexts = ax.pie(table[name], labels=categories, autopct="%1.0f%%", startangle=90,
                                          counterclock=False, textprops={"fontsize": 7})
        for i in range(len(categories)):
            artists[name, i] = [wedges[i], texts[i], autotexts[i]]
        ax.set_aspect("equal")
    elif kind == "line":
        for name, values in table.items():
            ax.plot(x, values, marker="o", linewidth=2, label=name)
        ax.set_xticks(x, categories)
    else:
        bar_width = 0.8 / len(table)
        for s, (name, values) in enumerate(table.items()):
            bars = ax.bar(x + (s - (len(table) - 1) / 2) * bar_width, values, bar_width, label=name)
            labels = ax.bar_label(bars, fontsize=7) if len(table) == 1 else [None] * len(values)
            for i in range(len(values)):
                artists[name, i] = [a for a in (bars[i], labels[i]) if a is not None]
        ax.set_xticks(x, categories)
    ax.set_title(chart["title"])
    if kind != "pie":
        ax.set_xlabel(chart["x_label"])
        ax.set_ylabel(chart["y_label"])
        ax.grid(axis="y", alpha=0.3)
        if len(table) > 1:
            ax.legend(fontsize=7)
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    renderer = fig.canvas.get_renderer()
    boxes = {}
    for series, i in elements:
        if kind == "line":  # a moved point also moves the line segments to its neighbours
            axes_box = ax.get_window_extent(renderer)
            x0 = ax.transData.transform((max(i - 1, 0), 0))[0]
            x1 = ax.transData.transform((min(i + 1, len(categories) - 1), 0))[0]
            extents = [(x0, axes_box.y0, x1, axes_box.y1)]
        else:
            extents = [a.get_window_extent(renderer).extents for a in artists[series, i]]
        x0, y0, x1, y1 = np.array(extents).T
        # display coordinates start at the bottom left, image rows at the top
        boxes[series, i] = [x0.min(), height - y1.max(), x1.max(), height - y0.min()]
    return image, boxes


def make_chart_pair(rng, index, args):
    """A chart and a copy in which two values of one series swap places."""
    width, height = args.size
    for _ in range(args.tries):
        chart = sample_chart(rng)
        name = str(rng.choice(list(chart["series"])))
        values = chart["series"][name]
        low, high = chart["value_range"]
        # a pie swaps neighbouring slices, so the other slices keep their places
        candidates = [(i, j) for i in range(len(values)) for j in range(i + 1, len(values))
                      if (chart["kind"] != "pie" or j == i + 1) and abs(values[i] - values[j]) >= 0.2 * (high - low)]
        if not candidates:
            continue
        i, j = candidates[rng.integers(len(candidates))]
        swapped = {**chart, "series": {**chart["series"], name: list(values)}}
        swapped["series"][name][i], swapped["series"][name][j] = values[j], values[i]
        elements = [(name, i), (name, j)]
        original, boxes_before = draw_chart(chart, width, height, elements)
        modified, boxes_after = draw_chart(swapped, width, height, elements)
        if check_pair(original, modified, args):
            continue
        diff = changed_mask(original, modified, args.pixel_threshold)
        changes = []
        for (series, k), before, after in ((elements[0], values[i], values[j]), (elements[1], values[j], values[i])):
            x0, y0 = np.floor(np.minimum(boxes_before[series, k][:2], boxes_after[series, k][:2])).astype(int) - 3
            x1, y1 = np.ceil(np.maximum(boxes_before[series, k][2:], boxes_after[series, k][2:])).astype(int) + 3
            region = np.zeros_like(diff)
            region[max(y0, 0):y1, max(x0, 0):x1] = True
            bbox = mask_bbox(diff & region)  # the pixels that changed where this value is drawn
            changes.append({"what": f"value {chart['categories'][k]}/{series}", "before": before, "after": after,
                            "bbox": bbox or mask_bbox(diff)})
        chart = {key: value for key, value in chart.items() if key != "value_range"}
        return original, modified, chart, changes
    raise PairSkipped("no valid chart", f"no valid chart in --tries {args.tries}")


# -----------------------------------------------------------------------------
# photo: local, realistic edits of your own photos, or ready-made pairs imported

PHOTO_EDITS = ("recolour", "remove", "duplicate", "mirror")


def load_photo(path, long_side):
    """A photo as uint8 RGB, upright (EXIF) and shrunk so its long side is at most long_side."""
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image).convert("RGB")  # convert() decodes: truncation shows here
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise PairSkipped("unreadable image", f"{path}: unreadable or truncated image ({error})")
    scale = min(1.0, long_side / max(image.size))
    size = (round(image.width * scale), round(image.height * scale))
    if min(image.size) < MIN_SIDE or min(size) < MIN_SIDE:
        raise PairSkipped("image too small", f"{path}: too small to edit ({image.width}x{image.height}; each side "
                                             f"needs at least {MIN_SIDE} px, also after shrinking to --long-side)")
    return np.asarray(image.resize(size, Image.BICUBIC) if scale < 1 else image)


def identifiable_images(paths):
    """The files PIL recognises as images (reads headers only, so it is fast); says which others are left out."""
    images = []
    for path in paths:
        try:
            with Image.open(path):
                images.append(path)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
            print(f"{PROG}: warning: skipped {path}: not an image PIL can read", file=sys.stderr)
    return images


def soft_ellipse(height, width, cx, cy, rx, ry, feather=0.25):
    """A mask that is 1 inside an ellipse and fades to 0 over the outer `feather` of its radius."""
    ys, xs = np.ogrid[0:height, 0:width]
    distance = np.sqrt(((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2)
    return np.clip((1 - distance) / feather, 0, 1).astype(np.float32)


def random_ellipse(rng, height, width, area_range):
    """Centre and radii of a random ellipse that covers area_range of the image and lies inside it."""
    area = rng.uniform(*area_range) * height * width
    aspect = rng.uniform(0.6, 1.6)
    rx, ry = math.sqrt(area / math.pi * aspect), math.sqrt(area / math.pi / aspect)
    rx, ry = min(rx, width / 2 - 2), min(ry, height / 2 - 2)
    return rng.uniform(rx, width - rx), rng.uniform(ry, height - ry), rx, ry


def edit_photo(rng, photo, kind):
    """One local edit of a photo: the edited copy, a mask of where it can differ, and what was done."""
    height, width, _ = photo.shape
    image = photo.astype(np.float32)
    cx, cy, rx, ry = random_ellipse(rng, height, width, (0.02, 0.08))
    mask = soft_ellipse(height, width, cx, cy, rx, ry)
    if kind == "recolour":
        # follow the object under the centre: keep pixels whose colour is close to the centre's
        centre_colour = image[int(cy), int(cx)]
        similarity = np.exp(-((image - centre_colour) ** 2).sum(2) / (2 * 45.0 ** 2))
        mask *= box_blur(similarity, 2)
        hsv = np.asarray(Image.fromarray(photo).convert("HSV")).astype(np.int16)
        shift = int(rng.integers(60, 196))
        hsv[..., 0] = (hsv[..., 0] + shift) % 256
        hsv[..., 1] = np.maximum(hsv[..., 1], 90)  # grey things get some colour, or the shift would not show
        target = np.asarray(Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB")).astype(np.float32)
    elif kind == "remove":
        # diffuse the surroundings into the hole, coarse to fine (normalised box blurs), plus matching grain
        hole = mask > 0
        known = (~hole).astype(np.float32)
        target = image * known[..., None]
        radius = int(max(rx, ry))
        while radius >= 1:
            weight = box_blur(known, radius)
            estimate = box_blur(target * known[..., None], radius) / np.maximum(weight, 1e-6)[..., None]
            target = np.where(hole[..., None], estimate, image)
            known = np.maximum(known, (weight > 0.01).astype(np.float32))  # filled pixels help the finer levels
            radius //= 2
        grain = (image - box_blur(image, 1))[~hole].std()
        target += rng.normal(0, grain, image.shape).astype(np.float32) * 0.7
        before, after = "region", "removed"
    elif kind == "duplicate":
        # copy the region under the ellipse to a place that does not overlap it
        for _ in range(20):
            dx, dy = rng.uniform(rx, width - rx), rng.uniform(ry, height - ry)
            if abs(dx - cx) > 2 * rx or abs(dy - cy) > 2 * ry:
                break
        shift_x, shift_y = int(round(dx - cx)), int(round(dy - cy))
        target = np.roll(image, (shift_y, shift_x), axis=(0, 1))
        mask = np.roll(mask, (shift_y, shift_x), axis=(0, 1))
        before, after = None, f"copy of the region at {[int(cx - rx), int(cy - ry), int(cx + rx), int(cy + ry)]}"
    else:  # mirror the region left to right
        x0, x1 = max(int(cx - rx), 0), min(int(cx + rx) + 1, width)
        target = image.copy()
        target[:, x0:x1] = image[:, x0:x1][:, ::-1]
        before, after = "region", "mirrored"
    edited = image * (1 - mask[..., None]) + target * mask[..., None]
    if kind == "recolour":  # the region's mean colour, before and after
        weights = mask[..., None] / mask.sum()
        before, after = ("#%02x%02x%02x" % tuple(int(c) for c in (a * weights).sum((0, 1))) for a in (image, edited))
    modified = np.clip(edited + 0.5, 0, 255).astype(np.uint8)
    return modified, mask, {"what": f"{kind} region", "before": before, "after": after}


def make_photo_pair(rng, index, args):
    """The photo for this index (cycling through --src) with one local edit; each visit a different kind."""
    path = args.photos[index % len(args.photos)]
    photo = load_photo(path, args.long_side)
    kind = PHOTO_EDITS[(index // len(args.photos) + index % len(args.photos)) % len(PHOTO_EDITS)]
    reason = None
    for _ in range(args.tries):
        modified, mask, change = edit_photo(rng, photo, kind)
        reason = check_pair(photo, modified, args)
        if reason is None:
            change["bbox"] = mask_bbox(mask > 0)
            return photo, modified, {"photo": path, "edit": kind}, [change]
    raise PairSkipped("edit not visible or not local",
                      f"{path}: no valid {kind} edit in --tries {args.tries} ({reason})")


def difference_boxes(diff, cell=16, min_pixels=16):
    """Boxes around the separate changed regions of a boolean mask (regions closer than a cell merge)."""
    height, width = diff.shape
    rows, cols = -(-height // cell), -(-width // cell)
    padded = np.zeros((rows * cell, cols * cell), bool)
    padded[:height, :width] = diff
    grid = padded.reshape(rows, cell, cols, cell).any(axis=(1, 3))
    labels = np.zeros(grid.shape, int)
    boxes = []
    for start in zip(*np.nonzero(grid)):
        if labels[start]:
            continue
        label = labels.max() + 1
        labels[start], stack = label, [start]
        while stack:  # flood fill over the 8 neighbouring cells
            y, x = stack.pop()
            for ny in range(max(y - 1, 0), min(y + 2, rows)):
                for nx in range(max(x - 1, 0), min(x + 2, cols)):
                    if grid[ny, nx] and not labels[ny, nx]:
                        labels[ny, nx] = label
                        stack.append((ny, nx))
        region = diff & np.kron(labels == label, np.ones((cell, cell), bool))[:height, :width]
        if region.sum() >= min_pixels:  # isolated specks are compression noise, not an edit
            boxes.append(mask_bbox(region))
    return boxes


def find_ready_pairs(folder):
    """(name, original path, modified path) for every X_original.* with an X_modified.*; and the other files."""
    found, others = {}, []
    for entry in sorted(os.listdir(folder)):
        path = os.path.join(folder, entry)
        stem, _ = os.path.splitext(entry)
        name, _, role = stem.rpartition("_")
        if os.path.isfile(path) and role in ("original", "modified") and name:
            found.setdefault(name, {})[role] = path
        elif os.path.isfile(path):
            others.append(path)
    pairs = [(name, p["original"], p["modified"]) for name, p in sorted(found.items()) if len(p) == 2]
    unmatched = [path for p in found.values() if len(p) == 1 for path in p.values()]
    return pairs, others + unmatched


def import_pair(rng, index, args):
    """A ready-made pair; each separate changed region becomes one change."""
    name, original_path, modified_path = args.ready_pairs[index]
    original = load_photo(original_path, args.long_side)
    modified = load_photo(modified_path, args.long_side)
    reason = check_pair(original, modified, args)
    if reason:
        raise PairSkipped(reason.split(" (")[0], f"{name}: {reason}")
    boxes = difference_boxes(changed_mask(original, modified, args.pixel_threshold))
    changes = [{"what": "region", "before": None, "after": None, "bbox": box} for box in boxes]
    return original, modified, {"name": name, "original": original_path, "modified": modified_path}, changes


# -----------------------------------------------------------------------------
# the run: parse flags, make the pairs in worker processes, write pairs.jsonl

MAKERS = {"clevr": make_clevr_pair, "cells": make_cells_pair, "chart": make_chart_pair, "photo": make_photo_pair, "import": import_pair}
_args = None  # the parsed flags, set in every worker process


def init_worker(args):
    global _args
    _args = args


def make_pair(index):
    """Make, check and save pair `index`; return (index, pairs.jsonl record or None, PairSkipped or None)."""
    args = _args
    rng = np.random.default_rng([args.seed, index])  # depends only on (seed, index), not on the worker
    try:
        original, modified, source, changes = MAKERS[args.maker](rng, index, args)
    except PairSkipped as skipped:
        return index, None, skipped
    pair_id = f"{index:0{args.id_digits}d}"
    paths = {role: f"images/{pair_id}_{role}.png" for role in ("original", "modified")}
    save_png(original, os.path.join(args.out, paths["original"]))
    save_png(modified, os.path.join(args.out, paths["modified"]))
    height, width, _ = original.shape
    record = {"id": pair_id, "domain": args.domain, "original": paths["original"], "modified": paths["modified"],
              "width": width, "height": height, "source": source, "changes": changes}
    return index, record, None


def parse_args(argv):
    parser = argparse.ArgumentParser(prog=PROG, description="Make 'Who is the spy?' image pairs for Vision-Zero.",
                                     formatter_class=cli.HelpFormatter)
    parser.add_argument("--domain", required=True, choices=["clevr", "chart", "photo", "cells"], help="kind of images to make")
    parser.add_argument("--n", type=int, help="number of pairs (default with --src: one per photo; --pairs: all)")
    parser.add_argument("--out", required=True, help="output folder; existing files of the same name are overwritten")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed and flags give the same bytes")
    parser.add_argument("--size", help="WxH of clevr and chart images (default 480x320) and cells images (default 112x112; "
                                       "56x56 for a model that sees 4 visual tokens)")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="processes to use (default: every core)")
    parser.add_argument("--tries", type=int, default=20, help="attempts per pair before it is skipped")
    parser.add_argument("--min-change", type=float, default=0.003, help="least fraction of pixels that must change")
    parser.add_argument("--max-change", type=float,
                        help="largest fraction of pixels that may change (default 0.25; cells 0.5: two of three "
                             "squares of a 56x56 picture are 26%%)")
    parser.add_argument("--pixel-threshold", type=int, default=16,
                        help="a pixel has changed if a channel differs by more than this (0-255)")
    parser.add_argument("--min-objects", type=int, help="clevr/cells: fewest objects in a scene (default 4 / 3)")
    parser.add_argument("--max-objects", type=int, help="clevr/cells: most objects in a scene (default 6 / 3)")
    parser.add_argument("--changes", type=int, default=2, help="clevr: objects that change colour and shape; cells: colour")
    parser.add_argument("--min-visible", type=int, default=150,
                        help="clevr: visible pixels every object needs (changed ones in both images); "
                             "lower it for a small --size")
    parser.add_argument("--src", help="photo: folder of photos to edit (cycled through when --n is larger)")
    parser.add_argument("--pairs", help="photo: folder of ready-made X_original.* / X_modified.* pairs to import")
    parser.add_argument("--import-domain", default="photo", help="with --pairs: the domain written in pairs.jsonl")
    parser.add_argument("--long-side", type=int, default=640, help="photo: larger photos are shrunk to this long side")
    args = parser.parse_args(argv)
    cells = args.domain == "cells"  # a tiny model's domain: 112x112, one square per visual token
    args.size = args.size or ("112x112" if cells else "480x320")
    args.min_objects = (3 if cells else 4) if args.min_objects is None else args.min_objects
    args.max_objects = (3 if cells else 6) if args.max_objects is None else args.max_objects
    args.max_change = (0.5 if cells else 0.25) if args.max_change is None else args.max_change
    smallest = CELL_SIZE if cells else MIN_SIDE  # a cells picture is a grid of 28-px cells
    try:
        args.size = tuple(int(v) for v in args.size.lower().split("x"))
        assert len(args.size) == 2 and min(args.size) >= smallest
    except (ValueError, AssertionError):
        die(f"--size {args.size!r} is not WxH with both sides at least {smallest}, e.g. --size 480x320")
    if args.n is not None and args.n <= 0:
        die(f"--n {args.n}: the number of pairs must be at least 1")
    if args.workers < 1 or args.tries < 1 or args.long_side < MIN_SIDE:
        die(f"--workers and --tries must be at least 1 and --long-side at least {MIN_SIDE}")
    if not 0 <= args.min_change < args.max_change <= 1:
        die("need 0 <= --min-change < --max-change <= 1 (fractions of the pixels)")
    if args.domain in ("clevr", "cells") and not 1 <= args.changes <= args.min_objects <= args.max_objects:
        die("need 1 <= --changes <= --min-objects <= --max-objects")
    if cells and (args.max_objects + args.changes > len(CELL_COLOURS)
                  or args.max_objects > (args.size[0] // CELL_SIZE) * (args.size[1] // CELL_SIZE)):
        die(f"cells: --max-objects + --changes must be at most {len(CELL_COLOURS)} (every square its own colour, "
            f"new colours unused) and --max-objects at most the {CELL_SIZE}-px cells of --size")
    if args.domain == "photo" and bool(args.src) == bool(args.pairs):
        die("--domain photo needs exactly one of --src PHOTO_FOLDER (edit photos) or --pairs FOLDER (import pairs)")
    if args.domain != "photo" and (args.src or args.pairs):
        die("--src and --pairs are for --domain photo only")
    if args.domain != "photo" and args.n is None:
        die(f"--domain {args.domain} needs --n, the number of pairs to make")
    return args


def main(argv=None):
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a plain kill still runs the cleanups below
    args.maker = args.domain
    if args.src:
        if not os.path.isdir(args.src):
            die(f"--src {args.src} is not a folder; give the folder that holds your photos")
        files = sorted(os.path.join(args.src, f) for f in os.listdir(args.src)
                       if os.path.isfile(os.path.join(args.src, f)))
        if not files:
            die(f"--src {args.src} holds no files; put photos (JPEG, PNG, ...) there")
        args.photos = identifiable_images(files)
        if not args.photos:
            die(f"--src {args.src} holds no image that PIL can read; put photos (JPEG, PNG, ...) there")
        if args.n is None:
            args.n = len(args.photos)
    if args.pairs:
        if not os.path.isdir(args.pairs):
            die(f"--pairs {args.pairs} is not a folder; give the folder with X_original.* / X_modified.* files")
        args.ready_pairs, others = find_ready_pairs(args.pairs)
        if not args.ready_pairs:
            die(f"--pairs {args.pairs} holds no X_original.* file with a matching X_modified.* file")
        for path in others:
            print(f"{PROG}: warning: skipped {path}: not half of an X_original.* / X_modified.* pair", file=sys.stderr)
        args.ready_pairs = args.ready_pairs[:args.n]
        args.n, args.maker, args.domain = len(args.ready_pairs), "import", args.import_domain
    try:
        os.makedirs(os.path.join(args.out, "images"), exist_ok=True)
        probe = os.path.join(args.out, "images", f".write-test-{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as error:
        die(f"cannot write to --out {args.out} ({error.strerror}); choose a folder you can write to")
    args.id_digits = max(6, len(str(args.n - 1)))

    start = time.time()
    records, skipped, warned = [], Counter(), set()
    workers = min(args.workers, args.n)
    pool = Pool(workers, initializer=init_worker, initargs=(args,)) if workers > 1 else None
    if pool is None:
        init_worker(args)
    results = pool.imap(make_pair, range(args.n)) if pool else map(make_pair, range(args.n))
    for index, record, skip in tqdm(results, total=args.n, desc=f"{args.domain} pairs", unit="pair"):
        if record:
            records.append(record)
        else:
            skipped[skip.reason] += 1
            if skip.detail not in warned:  # a bad photo is visited once per cycle; say it once
                warned.add(skip.detail)
                tqdm.write(f"{PROG}: warning: skipped pair {index}: {skip.detail}", file=sys.stderr)
    if pool:
        pool.close()
        pool.join()
    elapsed = time.time() - start

    why = ", ".join(f"{count} {reason}" for reason, count in skipped.most_common())
    print(f"{PROG}: made {len(records)} {args.domain} pairs in {args.out}, skipped {sum(skipped.values())}"
          f"{f' ({why})' if why else ''}, {elapsed:.1f} s, {len(records) / elapsed:.2f} pairs/s")
    if not records:  # no pairs.jsonl at all: an empty one would pass for a made folder (run.sh)
        die("no pair was made; see the warnings above")
    temporary = os.path.join(args.out, "pairs.jsonl.tmp")  # a killed run's one is overwritten here
    try:
        with open(temporary, "w") as f:  # written whole, then renamed: a crash never leaves half a file
            for record in records:
                f.write(json.dumps(record) + "\n")
        os.replace(temporary, os.path.join(args.out, "pairs.jsonl"))
    finally:
        if os.path.exists(temporary):  # only when the write failed or was interrupted
            os.remove(temporary)


if __name__ == "__main__":
    main()
