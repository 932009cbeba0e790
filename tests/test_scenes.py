import pytest
import torch

from pdmd.builtin import scenes


def test_same_seed_same_scenes_and_different_seed_different_scenes():
    images, labels = scenes.make_batch(16, seed=3)
    again, labels_again = scenes.make_batch(16, seed=3)
    other, _ = scenes.make_batch(16, seed=4)
    assert torch.equal(images, again)
    assert all(torch.equal(labels[k], labels_again[k]) for k in labels)
    assert not torch.allclose(images, other)


def test_images_are_rgb_32x32_in_unit_range_and_show_the_shape_colour():
    images, labels = scenes.make_batch(32, seed=0)
    assert images.shape == (32, 3, 32, 32)
    assert images.min() >= 0 and images.max() <= 1
    # the pixel at the shape's centre has the shape's colour (within the jitter)
    for i in range(32):
        x, y = int(labels["cx"][i]), int(labels["cy"][i])
        colour = torch.tensor(scenes.COLOURS[scenes.COLOUR_NAMES[labels["colour"][i]]])
        assert (images[i, :, y, x] - colour).abs().max() < 0.1


def test_one_prompt_admits_many_different_images():
    attributes = scenes.parse_prompt("a red star on a dark background").attributes
    labels = scenes.labels_for_prompt(attributes, 8, seed=1)
    assert set(scenes.prompts_of(labels)) == {"a red star on a dark background"}
    assert labels["cx"].std() > 2 and labels["radius"].std() > 0.5


def test_every_attribute_has_enough_values():
    assert len(scenes.SHAPES) >= 4 and len(scenes.COLOURS) >= 6 and len(scenes.BACKGROUNDS) >= 3


def test_known_prompt_parses_to_its_attributes_and_back():
    parsed = scenes.parse_prompt("A red Triangle on a dark background.")
    assert parsed.unknown == ()
    assert parsed.attributes == scenes.Attributes(scenes.COLOUR_NAMES.index("red"), scenes.SHAPES.index("triangle"),
                                                  scenes.BACKGROUND_NAMES.index("dark"))
    assert parsed.attributes.prompt == "a red triangle on a dark background"
    assert scenes.parse_prompt(parsed.attributes.prompt).attributes == parsed.attributes


def test_partial_prompt_leaves_the_rest_unspecified():
    parsed = scenes.parse_prompt("a star on gray")  # synonym of grey
    assert parsed.attributes == scenes.Attributes(None, scenes.SHAPES.index("star"), scenes.BACKGROUND_NAMES.index("grey"))
    assert scenes.parse_prompt("blue").attributes == scenes.Attributes(scenes.COLOUR_NAMES.index("blue"), None, None)


def test_unknown_words_are_reported_not_dropped():
    parsed = scenes.parse_prompt("a fluffy red dragon")
    assert parsed.unknown == ("fluffy", "dragon")
    assert parsed.attributes == scenes.Attributes(scenes.COLOUR_NAMES.index("red"), None, None)


def test_empty_prompt_is_unconditional():
    for text in ("", "   "):
        parsed = scenes.parse_prompt(text)
        assert parsed.unknown == ()
        assert parsed.class_id == scenes.UNCONDITIONAL_CLASS


def test_contradictory_prompt_is_an_error():
    with pytest.raises(scenes.PromptError, match="two different colours"):
        scenes.parse_prompt("a red blue circle")


def test_class_ids_are_distinct_and_in_range():
    ids = {scenes.class_id(c, s, b)
           for c in [None, *range(len(scenes.COLOURS))]
           for s in [None, *range(len(scenes.SHAPES))]
           for b in [None, *range(len(scenes.BACKGROUNDS))]}
    assert ids == set(range(scenes.NUM_CLASSES))
    assert scenes.UNCONDITIONAL_CLASS == scenes.NUM_CLASSES - 1


def test_condition_dropout_keeps_full_partial_and_unconditional_classes():
    labels = scenes.sample_labels(2000, torch.Generator().manual_seed(0))
    ids = scenes.drop_attributes(labels, torch.Generator().manual_seed(0))
    full = scenes.class_ids(labels["colour"], labels["shape"], labels["background"])
    unconditional = (ids == scenes.UNCONDITIONAL_CLASS).float().mean()
    assert 0.3 < (ids == full).float().mean() < 0.7
    assert 0.05 < unconditional < 0.2
    assert ((ids != full) & (ids != scenes.UNCONDITIONAL_CLASS)).any()
