"""The procedural scene world: objects on a 3x3 grid, rendered exactly.

A scene is 1 to 8 objects, each with a shape, a colour, a size and a grid
cell (row, col). At most one object per cell. The grid is chosen for
learnability by tiny models: with 16 px cells and 16 px patches every object
lands in exactly one image token, and spatial relations are relations between
grid cells (see docs/scene_world.md for the measured figures behind it).

Everything here is pure numpy and deterministic: the same scene renders to the
same bytes on every machine.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable

import numpy as np

SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SIZES = ("small", "medium", "large")
GRID = 3
CELL = 16
IMAGE_SIZE = GRID * CELL
MAX_OBJECTS = 8

RGB = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 205),
    "orange": (245, 140, 30),
}
BACKGROUND = (110, 110, 110)
# Half-extent of each size, as a fraction of the cell side.
RADIUS = {"small": 0.2, "medium": 0.32, "large": 0.46}
SUPERSAMPLE = 4
ROW_NAMES = ("top", "middle", "bottom")
COL_NAMES = ("left", "centre", "right")


@dataclasses.dataclass(frozen=True, order=True)
class Obj:
  row: int
  col: int
  shape: str
  colour: str
  size: str

  def __post_init__(self):
    problems = []
    if self.shape not in SHAPES:
      problems.append(f"shape {self.shape!r} is not one of {SHAPES}")
    if self.colour not in COLOURS:
      problems.append(f"colour {self.colour!r} is not one of {COLOURS}")
    if self.size not in SIZES:
      problems.append(f"size {self.size!r} is not one of {SIZES}")
    for name in ("row", "col"):
      v = getattr(self, name)
      if not isinstance(v, (int, np.integer)) or not 0 <= v < GRID:
        problems.append(f"{name} {v!r} is outside the {GRID}x{GRID} grid")
    if problems:
      raise ValueError("invalid object: " + "; ".join(problems))

  @property
  def cell(self) -> tuple[int, int]:
    return (self.row, self.col)

  def describe(self) -> str:
    return f"{self.size} {self.colour} {self.shape}"


@dataclasses.dataclass(frozen=True)
class Scene:
  """Objects sorted by cell; at most one per cell, 0..MAX_OBJECTS of them
  (an empty scene only arises from edits; generated scenes have >= 1)."""

  objects: tuple[Obj, ...]

  def __post_init__(self):
    objs = tuple(sorted(self.objects))
    object.__setattr__(self, "objects", objs)
    cells = [o.cell for o in objs]
    if len(set(cells)) != len(cells):
      raise ValueError("invalid scene: two objects share a grid cell")
    if len(objs) > MAX_OBJECTS:
      raise ValueError(f"invalid scene: {len(objs)} objects, at most {MAX_OBJECTS}")

  def __len__(self) -> int:
    return len(self.objects)

  def at(self, row: int, col: int) -> Obj | None:
    for o in self.objects:
      if o.cell == (row, col):
        return o
    return None

  def free_cells(self) -> list[tuple[int, int]]:
    used = {o.cell for o in self.objects}
    return [(r, c) for r in range(GRID) for c in range(GRID) if (r, c) not in used]

  def select(self, **attrs) -> list[Obj]:
    """Objects whose attributes equal every given value (None = any)."""
    return [o for o in self.objects
            if all(v is None or getattr(o, k) == v for k, v in attrs.items())]

  def replace_object(self, old: Obj, new: Obj | None) -> Scene:
    objs = [o for o in self.objects if o != old]
    if new is not None:
      objs.append(new)
    return Scene(tuple(objs))

  # -- serialisation ------------------------------------------------------------
  def to_json(self) -> str:
    return json.dumps([dataclasses.astuple(o) for o in self.objects],
                      separators=(",", ":"))

  @staticmethod
  def from_json(text: str) -> Scene:
    try:
      rows = json.loads(text)
      return Scene(tuple(Obj(int(r), int(c), s, k, z) for r, c, s, k, z in rows))
    except (ValueError, TypeError) as e:
      raise ValueError(f"not a serialised scene: {text[:80]!r} ({e})") from e

  def key(self) -> str:
    """A stable hash-friendly identity."""
    return self.to_json()


def random_scene(rng: np.random.Generator, min_objects: int = 1,
                 max_objects: int = MAX_OBJECTS) -> Scene:
  n = int(rng.integers(min_objects, max_objects + 1))
  cells = rng.permutation(GRID * GRID)[:n]
  objs = []
  for cell in cells:
    objs.append(Obj(int(cell) // GRID, int(cell) % GRID,
                    SHAPES[rng.integers(len(SHAPES))],
                    COLOURS[rng.integers(len(COLOURS))],
                    SIZES[rng.integers(len(SIZES))]))
  return Scene(tuple(objs))


# -- rendering -------------------------------------------------------------------

def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
  """Inside-test of a shape centred at 0 with half-extent r (pixel units)."""
  if shape == "circle":
    return dx * dx + dy * dy <= r * r
  if shape == "square":
    s = r * 0.86
    return (np.abs(dx) <= s) & (np.abs(dy) <= s)
  if shape == "diamond":
    return np.abs(dx) + np.abs(dy) <= r * 1.1
  if shape == "triangle":
    # Upward triangle: apex at top (dy = -r), base at dy = +0.8r.
    top, bottom = -r, 0.8 * r
    half_width = (dy - top) / (bottom - top) * r
    return (dy >= top) & (dy <= bottom) & (np.abs(dx) <= half_width)
  raise ValueError(f"unknown shape {shape!r}")


def _coverage_tables():
  ss = SUPERSAMPLE
  # Sub-pixel centres within one cell, in pixel units relative to the centre.
  coords = (np.arange(CELL * ss) + 0.5) / ss - CELL / 2
  dy, dx = np.meshgrid(coords, coords, indexing="ij")
  tables = {}
  for shape in SHAPES:
    for size in SIZES:
      m = _shape_mask(shape, dx, dy, RADIUS[size] * CELL).astype(np.float32)
      tables[shape, size] = m.reshape(CELL, ss, CELL, ss).mean(axis=(1, 3))
  return tables


_COVERAGE = _coverage_tables()


def render(scene: Scene) -> np.ndarray:
  """uint8 [IMAGE_SIZE, IMAGE_SIZE, 3]; anti-aliased by 4x4 supersampling."""
  img = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)
  img[...] = BACKGROUND
  for o in scene.objects:
    a = _COVERAGE[o.shape, o.size][..., None]
    ys, xs = o.row * CELL, o.col * CELL
    patch = img[ys:ys + CELL, xs:xs + CELL]
    patch[...] = patch * (1 - a) + np.asarray(RGB[o.colour], np.float32) * a
  return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def render_batch(scenes: Iterable[Scene]) -> np.ndarray:
  return np.stack([render(s) for s in scenes])


def vocabulary() -> tuple[str, ...]:
  """Every attribute word of the world."""
  return SHAPES + COLOURS + SIZES
