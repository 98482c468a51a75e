"""The demo dataset: the real photographs bundled with scikit-image, each with a rich caption written for this
project (LAION-POP style: 40-80 words on content, colours, composition and light) and a short alt text.

All nine colour photographs in `skimage.data` are included. Of the grayscale ones, camera, coins and moon are
real photographs with clear content; they also exercise the L -> RGB conversion of the loader. Left out:
synthetic images (colorwheel, chessboard, logo, horse silhouette, phantom), textures (brick, grass, gravel),
text scans (page, text), tiny or abstract microscopy (cell, microaneurysms) and the motion-blurred clock.
The scikit-image files are stored unchanged (PNG/JPEG bytes) in the shards.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from data.prep import PrepOptions, SourceRecord, write_shards

# Three samples per shard -> 4 shards: enough for 2 ranks x 2 workers in exact (non-resampled) mode.
DEMO_SAMPLES_PER_SHARD = 3
DEMO_KEY_PREFIX = "demo"  # every demo sample's key starts with it (how a rebuild knows its own shards)


@dataclass(frozen=True)
class DemoImage:
    """One scikit-image photo: its file in skimage.data's folder, a short alt text and a rich caption."""

    name: str  # skimage.data function name
    filename: str
    alt_text: str
    caption: str


DEMO_IMAGES: tuple[DemoImage, ...] = (
    DemoImage(
        "astronaut",
        "astronaut.png",
        "Eileen Collins official NASA astronaut portrait",
        "A formal studio portrait of a smiling woman astronaut with short light-brown hair, wearing a "
        "bright orange launch and entry flight suit with a round metal neck ring, embroidered mission "
        "patches and a name tag. An American flag hangs on the left, a white space shuttle model with an "
        "orange external tank stands on the right, and a black helmet with a reflective visor rests in "
        "the lower right corner against a mottled grey backdrop.",
    ),
    DemoImage(
        "coffee",
        "coffee.png",
        "espresso cup on wooden table",
        "A close-up, slightly top-down photograph of a single espresso in a glossy reddish-brown ceramic "
        "cup with a white interior, standing on a matching round saucer with a small stainless steel "
        "spoon leaning beside the cup. The coffee has a smooth light-brown crema. The saucer rests on a "
        "rustic wooden table with warm orange-brown grain, scratches and worn patches, lit by soft warm "
        "light that leaves the upper left corner in deep shadow.",
    ),
    DemoImage(
        "chelsea",
        "chelsea.png",
        "tabby cat close up",
        "A close-up portrait of a tabby cat with short brown, beige and black striped fur, gazing "
        "slightly to the left with large round yellow-green eyes and dark pupils. Its pinkish-orange "
        "nose, long white whiskers and pale chin are in sharp focus, while the background, a bright room "
        "with white furniture, is softly blurred. Warm natural indoor light and a shallow depth of field "
        "give the photograph an intimate, gentle mood.",
    ),
    DemoImage(
        "rocket",
        "rocket.jpg",
        "rocket on the launch pad at dusk",
        "A tall white two-stage rocket stands on its launch pad at dusk, framed by four slender steel "
        "lightning-protection towers of open lattice framework. The sky fades from deep blue at the top "
        "to a soft pale glow near the horizon, and bright floodlights around the base of the pad burst "
        "into star-shaped sparkles. A small emblem marks the rocket's nose cone, and a low band of dark "
        "clouds lines the horizon behind the launch complex.",
    ),
    DemoImage(
        "motorcycle_left",
        "motorcycle_left.png",
        "red Yamaha motorcycle in a garage",
        "A red vintage Yamaha cruiser motorcycle with a black quilted two-level seat, a chrome V-twin "
        "engine, spoked wheels and a round headlight, parked on its kickstand on a bare concrete floor "
        "in a cluttered garage. Behind it stand metal shelves filled with cardboard boxes, a red plastic "
        "storage bin, tools and containers, next to a weathered wooden bench, a bicycle wheel and "
        "unfinished wooden wall panels under warm indoor light.",
    ),
    DemoImage(
        "motorcycle_right",
        "motorcycle_right.png",
        "classic red motorcycle parked indoors",
        "Side view of a classic red motorcycle with a glossy fuel tank lettered YAMAHA, a chrome front "
        "fork, a disc brake on the front wheel and a black stitched seat, standing on its side stand "
        "inside a home garage. Grey steel shelving loaded with brown cardboard boxes, white plastic tubs "
        "and a red bin fills the background, beside an old wooden bench, a pale door and exposed wooden "
        "studs, all in warm, even light.",
    ),
    DemoImage(
        "hubble_deep_field",
        "hubble_deep_field.jpg",
        "Hubble deep field galaxies",
        "A deep-space astronomical image in which thousands of distant galaxies are scattered across a "
        "pitch-black background. Spiral galaxies seen face-on and edge-on, glowing yellow-orange "
        "elliptical galaxies and countless faint blue, red and white smudges of every size fill the "
        "frame, and a few bright foreground stars show sharp cross-shaped diffraction spikes. A Hubble "
        "Space Telescope deep field view of the early universe.",
    ),
    DemoImage(
        "immunohistochemistry",
        "ihc.png",
        "immunohistochemistry stained tissue section",
        "A microscope photograph of a thin tissue section stained for immunohistochemistry: rounded "
        "glands of tall columnar epithelial cells are outlined by a brown DAB stain along their cell "
        "membranes, forming a fine honeycomb pattern, while the cell nuclei and the loose connective "
        "tissue between the glands are counterstained pale blue with haematoxylin. A small gland cut in "
        "cross-section appears as a brown rosette near the bottom centre.",
    ),
    DemoImage(
        "retina",
        "retina.jpg",
        "retina fundus photograph",
        "A colour fundus photograph of a healthy human retina: a round orange-red disc surrounded by "
        "black. The bright yellowish optic disc sits near the left edge, and dark red blood vessels "
        "branch out from it, arching above and below across the retina toward the darker macula in the "
        "centre. Fine capillaries, a smooth even texture and a small notch at the upper right rim of the "
        "circular field of view complete the clinical image.",
    ),
    DemoImage(
        "camera",
        "camera.png",
        "cameraman test image",
        "A black-and-white photograph of a young man with dark hair in a long black overcoat and gloves, "
        "bending forward to look through a vintage camera mounted on a tall metal tripod. He stands on a "
        "wide, flat grassy field on a bright day, with a pale, almost white sky above and low buildings, "
        "domes and a tall tower on the distant horizon. A classic, high-contrast image-processing test "
        "photograph.",
    ),
    DemoImage(
        "coins",
        "coins.png",
        "ancient Greek coins",
        "A black-and-white photograph of twenty-four ancient silver and bronze coins arranged in four "
        "neat rows on a dark background. Each worn, slightly irregular coin shows a profile head, a "
        "helmeted figure, a standing deity or an animal in relief, with soft highlights on the raised "
        "surfaces and darker worn edges. A museum-style catalogue photograph of a coin collection, "
        "evenly lit from above.",
    ),
    DemoImage(
        "moon",
        "moon.png",
        "surface of the moon",
        "A grayscale close-up photograph of the surface of the Moon, an even field of fine grey lunar "
        "soil scattered with small craters and pebbles. A bright round crater with a sharp rim sits near "
        "the upper left, a small dark pit lies near the top centre, and a chain of darker, rough patches "
        "and ejecta runs down the middle of the frame. Low contrast, uniform lighting, seen from "
        "directly above.",
    ),
)


def demo_records(data_dir: str | None = None) -> list[SourceRecord]:
    """The demo images as prep records (json: caption, alt_txt, source; txt: the caption)."""
    if data_dir is None:
        import skimage.data  # optional dependency (pip install .[data])

        data_dir = skimage.data.data_dir
    records = []
    for image in DEMO_IMAGES:
        meta: dict[str, Any] = {
            "caption": image.caption,
            "alt_txt": image.alt_text,
            "dataset": f"scikit-image skimage.data.{image.name}",
        }
        path = os.path.join(data_dir, image.filename)
        records.append(SourceRecord(image.name, image_path=path, meta=meta, txt=image.caption))
    return records


def foreign_shard(out: str) -> str | None:
    """The first shard in `out` that an earlier demo build did not write (its first sample's key lacks the demo's
    prefix, or it cannot be read), or None: only the demo's own shards may be replaced."""
    import glob
    import tarfile

    for path in sorted(glob.glob(os.path.join(glob.escape(out), "*.tar"))):
        try:
            with tarfile.open(path) as tar:
                first = tar.next()
        except (OSError, tarfile.TarError):
            return path
        if first is None or not os.path.basename(first.name).startswith(DEMO_KEY_PREFIX):
            return path
    return None


def build_demo_shards(out: str, data_dir: str | None = None) -> dict[str, Any]:
    """Write the demo shards into `out` (replacing an earlier demo build's; the bytes are reproducible).

    Returns the prep summary {"written", "skipped", "shards", "out", ...}. FileExistsError when `out` holds shards
    the demo did not write (they are left alone).
    """
    if (other := foreign_shard(out)) is not None:
        raise FileExistsError(f"{out} holds shards the demo did not write (e.g. {os.path.basename(other)}): give an "
                              "empty folder or an earlier demo build's")
    opts = PrepOptions(samples_per_shard=DEMO_SAMPLES_PER_SHARD, key_prefix=DEMO_KEY_PREFIX, overwrite=True)
    return write_shards(demo_records(data_dir), out, opts)
