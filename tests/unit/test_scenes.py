"""The synthetic scene world: captions name their scene, and caption_attributes reads them back."""
import random

from mgpt4_dist.data.text import blip_caption
from mgpt4_dist.tiny.scenes import _TEMPLATES, caption_attributes, describe, random_scene, synthetic_scenes


def test_every_template_names_its_scene_as_the_scorer_reads_it():
    rng = random.Random(0)
    for _ in range(200):
        scene = random_scene(rng)
        for template in range(len(_TEMPLATES)):
            caption = describe(scene, random.Random(template))
            for text in (caption, blip_caption(caption)):
                assert caption_attributes(text) == {"fg": scene.fg, "shape": scene.shape, "bg": scene.bg}, text


def test_scenes_depend_only_on_seed_and_index():
    a = [(k, s, c) for k, _, s, c in synthetic_scenes(30, seed=3, image_size=16)]
    assert a[:10] == [(k, s, c) for k, _, s, c in synthetic_scenes(10, seed=3, image_size=16)]
    assert a != [(k, s, c) for k, _, s, c in synthetic_scenes(30, seed=4, image_size=16)]

