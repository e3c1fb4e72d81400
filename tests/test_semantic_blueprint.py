"""The semantic blueprint codec: vocabulary, exact round trips on the data engine's scenes, plan scores of
true blueprints for every canonical prompt category, the verifier reading previews, and total decoding."""

from collections import Counter
from functools import cache

import numpy as np
import pytest
import torch

from blip3o_next.eval.scorers import check_t2i
from blip3o_next.models.semantic_blueprint import (
    BACKGROUND_NAMES,
    DEFAULT_VOCAB,
    FACTOR_NAMES,
    BlueprintConfig,
    SemanticVocab,
    TokenFactors,
    TokenKind,
    anchor_centre,
    anchor_of,
    decode_batch,
    decode_tokens,
    encode_batch,
    encode_scene,
    plan_score,
    preview,
)
from blip3o_next.shapeworld.prompts import CATEGORIES, canonical_prompt, parse_prompt
from blip3o_next.shapeworld.render import make_text
from blip3o_next.shapeworld.sampler import PlacementError, sample_scene, sample_scene_for
from blip3o_next.shapeworld.world import (
    BACKGROUNDS,
    COLORS,
    RELATIONS,
    SAMPLING_SLACK,
    Box,
    Scene,
    ShapeObject,
    TextObject,
    region_holds,
    relation_holds,
)
from blip3o_next.eval.verifier import SceneParser

V = DEFAULT_VOCAB
CFG = V.config
N = CFG.seq_len
SHAPE_ERROR = 0.5  # px per axis: half of a 1 px bin
TEXT_ERROR = 0.5 + 0.125  # ...plus make_text's snap of the ink box to the quarter-pixel grid
# Non-canonical prompts that relate the word to a shape: where 2 px bins broke the decoded scene itself.
TEXT_RELATION_PROMPTS = [f'a photo of the word "AB" {r} a red circle' for r in RELATIONS] + [
    f'a photo of a blue star {r} the word "I"' for r in RELATIONS
]


@cache
def sampled_scenes(n: int, seed: int) -> tuple[Scene, ...]:
    """Random scenes of the data engine, half of them with a word (some in color)."""
    return tuple(
        sample_scene(np.random.default_rng([seed, i]), text_probability=0.5, colored_text_probability=0.3) for i in range(n)
    )


@cache
def prompt_scenes(per_category: int, seed: int) -> tuple[tuple[str, str, Scene], ...]:
    """(category, prompt, scene) for random canonical prompts of every category (plus prompts relating the word
    to a shape), each parsed back by the prompt parser and sampled by the data engine."""
    out = []
    for ci, category in enumerate(CATEGORIES + ("text_relation",)):
        rng = np.random.default_rng([seed, ci])
        got = 0
        for k in range(per_category * 5):
            if got == per_category:
                break
            if category == "text_relation":
                text = TEXT_RELATION_PROMPTS[k % len(TEXT_RELATION_PROMPTS)]
            else:
                text = canonical_prompt(category, rng).text
            try:
                scene = sample_scene_for(parse_prompt(text), rng)
            except PlacementError:  # some dense prompts do not fit a 64 px canvas
                continue
            out.append((category, text, scene))
            got += 1
        assert got == per_category, category
    return tuple(out)


def anchor_key(cx: float, cy: float) -> int:
    return anchor_of(cx, cy, CFG)[0]


# ----------------------------------------------------------------------------- vocabulary


def test_vocab_size_and_layout():
    n_shape, n_text = 6 * 8 * 15 * 8 * 8, 10 * 5 * 8 * 8
    assert (n_shape, n_text) == (46_080, 3_200)
    assert V.size == 3 + 1 + n_shape + n_text + 26 + 1 == 49_311
    assert N == 69 and list(CFG.cell_positions) == list(range(1, 65)) and list(CFG.letter_positions) == [65, 66, 67, 68]
    kinds = V.factor_table()["kind"]
    # blocks in the documented order: backgrounds, EMPTY, shape anchors, text anchors, letters, PAD
    runs = [(int(k), int(n)) for k, n in zip(*np.unique_counts(kinds))]
    assert runs == [(TokenKind.BACKGROUND, 3), (TokenKind.EMPTY, 1), (TokenKind.SHAPE, n_shape), (TokenKind.TEXT, n_text),
                    (TokenKind.LETTER, 26), (TokenKind.PAD, 1)]
    assert (np.diff(kinds) >= 0).all()
    # the design's 4 bins of 2 px would give 12,351 ids
    assert SemanticVocab(BlueprintConfig(offset_bins=4)).size == 3 + 1 + 11_520 + 800 + 26 + 1


def test_every_id_round_trips_through_its_factors_and_the_table():
    table = V.factor_table()
    assert tuple(table) == FACTOR_NAMES and all(a.shape == (V.size,) and a.dtype == np.int64 for a in table.values())
    assert not table["shape"].flags.writeable  # shared, so read-only
    rows = np.asarray([V.factors(i) for i in range(V.size)], np.int64)
    assert np.array_equal(rows, np.stack([table[name] for name in FACTOR_NAMES], axis=1))
    assert all(V.token(V.factors(i)) == i for i in range(V.size))
    cards = V.factor_cardinalities()
    used = {
        TokenKind.BACKGROUND: {"background"},
        TokenKind.EMPTY: set(),
        TokenKind.SHAPE: {"shape", "color", "size", "dx", "dy"},
        TokenKind.TEXT: {"ink", "cap", "dx", "dy"},
        TokenKind.LETTER: {"letter"},
        TokenKind.PAD: set(),
    }
    for kind, names in used.items():
        rows_of_kind = table["kind"] == kind
        for name in FACTOR_NAMES[1:]:
            values = table[name][rows_of_kind]
            if name in names:  # every value of the factor occurs, and only those
                assert np.array_equal(np.unique(values), np.arange(cards[name])), (kind, name)
            else:
                assert (values == -1).all(), (kind, name)


def test_named_constructors_and_their_errors():
    t = V.shape_token("star", "red", 12, 1, 7)
    assert V.factors(t) == TokenFactors(TokenKind.SHAPE, shape=4, color=0, size=2, dx=1, dy=7)
    assert V.describe(t) == "shape red star s=12 dx=1 dy=7"
    assert V.describe(V.text_token("white", 14, 7, 0)) == "text white cap=14 dx=7 dy=0"
    assert V.factors(V.letter_token("Z")) == TokenFactors(TokenKind.LETTER, letter=25)
    assert [V.describe(V.background_token(b)) for b in BACKGROUNDS] == ["background white", "background gray", "background black"]
    with pytest.raises(ValueError, match="unknown shape 'hexagon'"):
        V.shape_token("hexagon", "red", 12, 0, 0)
    with pytest.raises(ValueError, match="size 25 outside"):
        V.shape_token("star", "red", 25, 0, 0)
    with pytest.raises(ValueError, match="dx index 8 outside"):
        V.shape_token("star", "red", 12, 8, 0)
    with pytest.raises(ValueError, match="unknown ink 'gray'"):
        V.text_token("gray", 12, 0, 0)
    with pytest.raises(ValueError, match=r"\['letter'\] do not apply to a SHAPE"):
        V.token(TokenFactors(TokenKind.SHAPE, shape=0, color=0, size=0, dx=0, dy=0, letter=3))


def test_position_mask_allows_exactly_the_right_kinds():
    mask, kinds = V.position_mask(), V.factor_table()["kind"]
    assert mask.shape == (N, V.size) and mask.dtype == bool and not mask.flags.writeable
    assert np.array_equal(mask[0], kinds == TokenKind.BACKGROUND)
    cell_kinds = np.isin(kinds, [TokenKind.EMPTY, TokenKind.SHAPE, TokenKind.TEXT])
    assert all(np.array_equal(mask[p], cell_kinds) for p in range(1, 65))
    letter_kinds = np.isin(kinds, [TokenKind.LETTER, TokenKind.PAD])
    assert all(np.array_equal(mask[p], letter_kinds) for p in range(65, 69))
    assert mask.sum(1).tolist() == [3] + [1 + 46_080 + 3_200] * 64 + [27] * 4


# ----------------------------------------------------------------------------- round trips


def test_round_trip_of_sampled_scenes():
    scenes = sampled_scenes(300, 0)
    texts = [s.text for s in scenes if s.text is not None]
    assert {s.background for s in scenes} == set(BACKGROUNDS) and len(texts) > 100
    assert any(t.color in COLORS for t in texts) and {"black", "white"} <= {t.color for t in texts}
    ids = encode_batch(scenes)
    assert ids.shape == (300, N) and V.position_mask()[np.arange(N), ids].all()
    worst_shape = worst_text = 0.0
    for scene, row, back in zip(scenes, ids, decode_batch(ids)):
        assert back.canvas == 64 and back.background == scene.background
        assert Counter((o.shape, o.color) for o in back.objects) == Counter((o.shape, o.color) for o in scene.objects)
        # decoded objects come in raster order of their anchor cells
        for o, b in zip(sorted(scene.objects, key=lambda o: anchor_key(o.cx, o.cy)), back.objects):
            assert (b.shape, b.color, b.size) == (o.shape, o.color, o.size)
            worst_shape = max(worst_shape, abs(b.cx - o.cx), abs(b.cy - o.cy))
        if scene.text is None:
            assert back.text is None
        else:
            t, b = scene.text, back.text
            assert (b.word, b.color, b.cap_height, b.width, b.height) == (t.word, t.color, t.cap_height, t.width, t.height)
            worst_text = max(worst_text, abs(b.cx - t.cx), abs(b.cy - t.cy))
        assert encode_scene(back) == row.tolist()  # decoding lands inside the same bins: encoding is idempotent
    assert 0.25 <= worst_shape <= SHAPE_ERROR and worst_text <= TEXT_ERROR


def test_sizes_round_half_up_and_clamp():
    def size_after(size: float) -> float:
        return decode_tokens(encode_scene(Scene(64, "white", (ShapeObject("circle", "red", 32, 32, size),)))).objects[0].size

    assert [size_after(s) for s in (9.4, 10.0, 12.5, 13.5, 17.49, 24.6)] == [10, 10, 13, 14, 17, 24]


def test_quantisation_keeps_relations_regions_and_slack_exhaustively():
    """Over every quarter-pixel centre (shapes) and every eighth-pixel centre with make_text's +-1/8 px snap
    (words): relations and regions that hold before encoding hold after it; the sampler's 1 px slack survives."""

    def q(x: float) -> float:
        cell, dx, _ = anchor_of(x, 0.0, CFG)
        return anchor_centre(cell, dx, 0, CFG)[0]

    quarter, eighth = np.arange(0, 64, 0.25), np.arange(0, 64, 0.125)
    qq = np.array([q(x) for x in quarter])
    assert np.abs(qq - quarter).max() == SHAPE_ERROR

    def boxes(xs: np.ndarray) -> Box:
        return Box(xs, 0.0, xs, 0.0)  # relations and regions read only the centre

    a, b = quarter[:, None], quarter[None, :]
    qa, qb = qq[:, None], qq[None, :]
    for slack in (0.0, SAMPLING_SLACK):
        before = relation_holds(boxes(a), "left of", boxes(b), 64, slack)
        assert relation_holds(boxes(qa), "left of", boxes(qb), 64, slack)[before].all()  # shapes keep even the slack
    qe = np.array([q(x) for x in eighth])
    for snap in (-0.125, 0.0, 0.125):  # a word against a shape
        text, decoded_text = eighth[:, None], qe[:, None] + snap
        for rel in ("left of", "right of"):
            before = relation_holds(boxes(text), rel, boxes(b), 64, SAMPLING_SLACK)
            assert relation_holds(boxes(decoded_text), rel, boxes(qb), 64)[before].all()
            assert relation_holds(boxes(decoded_text), rel, boxes(qb), 64, 0.875)[before].all()

    def holds(region: str, axis: int, x: float, slack: float = 0.0) -> bool:
        centre = [32.0, 32.0]
        centre[axis] = x
        return region_holds(Box(*centre, *centre), region, 64, slack)

    for region, axis in (("left side", 0), ("right side", 0), ("center", 0), ("top", 1), ("bottom", 1), ("center", 1)):
        assert all(holds(region, axis, q(x)) for x in quarter if holds(region, axis, x))
        # words of sampled scenes keep >= 0.975 px to spare
        snapped = [q(x) + s for x in eighth for s in (-0.125, 0.0, 0.125) if holds(region, axis, x, SAMPLING_SLACK)]
        assert all(holds(region, axis, x, 0.97) for x in snapped)


def test_two_pixel_bins_would_eat_the_sampling_slack():
    """Why the offsets use 1 px bins: two shapes 9 px apart (margin 8 + the sampler's 1 px slack) decode exactly
    on the margin with the design's 2 px bins, and keep the slack with 1 px bins."""
    scene = Scene(64, "white", (ShapeObject("circle", "red", 16.0, 16.0, 10.0), ShapeObject("square", "blue", 25.0, 40.0, 10.0)))
    coarse = SemanticVocab(BlueprintConfig(offset_bins=4))
    for vocab, gap in ((coarse, 8.0), (V, 9.0)):
        a, b = decode_tokens(encode_scene(scene, vocab), vocab).objects
        assert b.cx - a.cx == gap


# ----------------------------------------------------------------------------- prompts


def test_true_blueprints_pass_every_canonical_category():
    items = prompt_scenes(25, 1)
    assert {c for c, _, _ in items} == set(CATEGORIES) | {"text_relation"}
    for category, text, scene in items:
        req = parse_prompt(text)
        assert check_t2i(req, scene).passed  # the scene itself passes...
        result = plan_score(encode_scene(scene), req)  # ...and so does its blueprint
        assert result.passed and result.partial == 1.0, (category, text, result.reasons)


def test_verifier_reads_the_preview_of_true_blueprints():
    items = prompt_scenes(4, 2)
    images = []
    for _, _, scene in items:
        image = preview(encode_scene(scene))
        assert image.size == (64, 64) and image.mode == "RGB"
        images.append(np.asarray(image))
    for (category, text, _), parsed in zip(items, SceneParser().parse_batch(np.stack(images))):
        result = check_t2i(parse_prompt(text), parsed)
        assert result.passed, (category, text, result.reasons)


# ----------------------------------------------------------------------------- anchors


def test_anchors_never_collide_in_sampled_scenes():
    """Shapes' centres are >= 12 px apart along some axis, a word's >= 8 px from any shape's (but see below)."""
    scenes = sampled_scenes(2000, 3) + tuple(s for _, _, s in prompt_scenes(25, 1))
    closest_shapes = closest_any = np.inf
    for scene in scenes:
        centres = [(o.cx, o.cy) for o in scene.objects]
        n_shapes = len(centres)
        if scene.text is not None:
            centres.append((scene.text.cx, scene.text.cy))
        cells = [anchor_key(x, y) for x, y in centres]
        assert len(set(cells)) == len(cells)
        for i in range(len(centres)):
            for j in range(i):
                d = max(abs(centres[i][0] - centres[j][0]), abs(centres[i][1] - centres[j][1]))
                closest_any = min(closest_any, d)
                if i < n_shapes:
                    closest_shapes = min(closest_shapes, d)
        encode_scene(scene)
    assert closest_shapes >= 12.0 and closest_any >= 8.0


def test_the_one_collision_the_contract_allows_is_an_error():
    """A single "I" (ink 1.5 px wide) 2 px from a size-10 shape: both centres in cell (row 2, col 4). The data
    engine makes such a scene about once in 20,000; the encoder refuses it rather than drop an object."""
    word = make_text("I", 32.0, 20.0, 10.0, "black")
    square = ShapeObject("square", "red", 39.75, 20.0, 10.0)
    assert word.box.gap_to(square.box) == 2.0
    with pytest.raises(ValueError, match=r"both anchor in cell \(row 2, col 4\)"):
        encode_scene(Scene(64, "white", (square,), word))


# ----------------------------------------------------------------------------- decoding rules and errors


def test_any_in_range_sequence_decodes():
    rng = np.random.default_rng(5)
    mask = V.position_mask()
    allowed = [np.flatnonzero(mask[p]) for p in range(N)]
    uniform = rng.integers(0, V.size, size=(200, N))
    masked = np.stack([[rng.choice(allowed[p]) for p in range(N)] for _ in range(100)])
    for ids in np.concatenate([uniform, masked]):
        scene = decode_tokens(ids)
        assert scene.canvas == 64 and scene.background in BACKGROUNDS
        n_shape_cells = int((V.factor_table()["kind"][ids[1:65]] == TokenKind.SHAPE).sum())
        assert len(scene.objects) == n_shape_cells
    assert np.asarray(preview(masked[0])).shape == (64, 64, 3)


def _word_scene() -> Scene:
    return Scene(64, "gray", (ShapeObject("circle", "red", 12.0, 12.0, 12.0),), make_text("CAT", 32.0, 44.0, 12.0, "black"))


def test_decoding_rules_for_malformed_blueprints():
    base = encode_scene(_word_scene())
    text_pos = next(p for p in CFG.cell_positions if V.kind(base[p]) is TokenKind.TEXT)
    shape_pos = next(p for p in CFG.cell_positions if V.kind(base[p]) is TokenKind.SHAPE)
    A, B, PAD = V.letter_token("A"), V.letter_token("B"), V.pad_id

    def decoded(**changes: int) -> Scene:
        ids = list(base)
        for pos, token in changes.items():
            ids[int(pos[1:])] = token
        return decode_tokens(ids)

    assert decoded().text.word == "CAT" and decoded().background == "gray"
    # a text anchor without letters gives no text; letters without a text anchor give none either
    assert decoded(p65=PAD, p66=PAD, p67=PAD).text is None
    assert decoded(**{f"p{text_pos}": V.empty_id}).text is None
    # letters after a PAD (or any non-letter) are ignored
    assert decoded(p65=A, p66=PAD, p67=B, p68=B).text.word == "A"
    assert decoded(p66=base[shape_pos], p67=B).text.word == "C"
    # a second text anchor (later in raster order) is ignored; the first one stays
    later = decoded(p64=V.text_token("red", 14, 0, 0))
    assert later.text == decoded().text
    # tokens at the wrong positions are ignored
    assert decoded(p0=base[shape_pos]).background == "white"
    assert decoded(p0=V.empty_id).background == "white"
    wrong = decoded(**{f"p{shape_pos}": A, "p5": V.background_token("black"), "p6": PAD})
    assert wrong.objects == () and wrong.text == decoded().text


def test_decode_accepts_lists_numpy_and_torch():
    ids = encode_scene(_word_scene())
    scene = decode_tokens(ids)
    assert decode_tokens(np.asarray(ids)) == scene == decode_tokens(torch.tensor(ids))
    assert plan_score(torch.tensor(ids), parse_prompt('a red circle and the word "CAT" on a gray background')).passed


@pytest.mark.parametrize(
    "ids, message",
    [
        ([0] * 68, "length 69, got length 68"),
        ([0] * 70, "length 69, got length 70"),
        ([], "length 69, got length 0"),
        ([0] * 68 + [-1], "token id -1 at position 68 out of range"),
        ([49_311] + [0] * 68, "token id 49311 at position 0 out of range"),
        ([0.0] * 69, "integers"),
        (np.zeros((3, 69), np.int64), "integers"),
    ],
)
def test_decode_rejects_bad_length_and_ids(ids, message):
    with pytest.raises(ValueError, match=message):
        decode_tokens(ids)


@pytest.mark.parametrize(
    "scene, message",
    [
        (Scene(128, "white", (ShapeObject("circle", "red", 32, 32, 20),)), "64px canvas, the scene's is 128px"),
        (Scene(64, "white", (ShapeObject("circle", "red", 64.0, 32, 12),)), r"centre \(64.0, 32\) lies outside"),
        (Scene(64, "white", (ShapeObject("circle", "red", 10, 10, 12), ShapeObject("star", "red", 14, 12, 8))), "anchor in cell"),
        (Scene(64, "white", (), TextObject("HELLO", "black", 32, 32, 12, 40, 12)), "'HELLO' is not 1 to 4 letters"),
        (Scene(64, "white", (), TextObject("hi", "black", 32, 32, 12, 10, 12)), "'hi' is not 1 to 4 letters"),
        (Scene(64, "white", (), TextObject("HI", "gray", 32, 32, 12, 10, 12)), "unknown ink 'gray'"),
        (Scene(64, "blue", ()), "unknown background 'blue'"),
        (Scene(64, "white", (ShapeObject("oval", "red", 32, 32, 12),)), "unknown shape 'oval'"),
    ],
)
def test_encode_rejects_what_it_cannot_write(scene, message):
    with pytest.raises(ValueError, match=message):
        encode_scene(scene)


def test_background_names_follow_the_world():
    assert BACKGROUND_NAMES == tuple(BACKGROUNDS)


def test_object_boxes_name_each_drawing_token_and_its_box():
    from blip3o_next.models.semantic_blueprint import object_boxes

    word = make_text("HIMW", 32.5, 44.5, 12, "blue")
    scene = Scene(64, "white", (ShapeObject("star", "red", 12.5, 12.5, 12),), word)
    boxes = object_boxes(encode_scene(scene))
    c = DEFAULT_VOCAB.config
    assert boxes[:, 0].tolist() == [c.cell_positions[9], c.cell_positions[44], *c.letter_positions]
    assert boxes[0, 1:].tolist() == [12.5, 12.5, 6.0, 6.0]
    letters = boxes[2:]
    left, right = letters[:, 1] - letters[:, 3], letters[:, 1] + letters[:, 3]
    assert np.all(np.diff(letters[:, 1]) > 0) and np.all(right[:-1] <= left[1:])  # left to right, no overlap
    assert left[0] == word.cx - word.width / 2 and right[-1] == word.cx + word.width / 2  # the ink box's ends
