"""The pictures of the demo products: one SVG illustration each, drawn from a few shapes.

The files live in `static/products/` (`p-001.svg` ... `p-024.svg`, the ids of
`example_shop.catalog.seed`) and are committed; this module is how they were made. After
changing a drawing, write them again:

    python -m example_shop.storefront.artwork

Each picture is 400 x 300, a coloured backdrop with the object on it; the colours are the
product's own so that the grid reads at a glance (white mug on terracotta, navy tin of Earl
Grey, yellow bag of Ethiopian coffee...). Text in the drawings is decoration only: the page
gives every picture the product's name as its alternative text.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from html import escape
from pathlib import Path

from example_shop.catalog.seed import DEMO_PRODUCTS

__all__ = ["PICTURES", "Picture", "picture_svg", "write_pictures"]

PRODUCTS_DIR = Path(__file__).with_name("static") / "products"
WIDTH, HEIGHT = 400, 300
INK = "#2b211d"
"""The outline colour of every drawing."""


@dataclass(frozen=True, kw_only=True)
class Picture:
    """One product's picture: its backdrop (top and bottom colour) and what stands on it."""

    backdrop: tuple[str, str]
    draw: Callable[[], str]


def _frame(title: str, picture: Picture) -> str:
    top, bottom = picture.backdrop
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'width="{WIDTH}" height="{HEIGHT}" role="img">\n'
        f"<title>{escape(title)}</title>\n"
        '<defs><linearGradient id="backdrop" x1="0" y1="0" x2="0" y2="1">'
        f'<stop offset="0" stop-color="{top}"/><stop offset="1" stop-color="{bottom}"/>'
        "</linearGradient></defs>\n"
        f'<rect width="{WIDTH}" height="{HEIGHT}" fill="url(#backdrop)"/>\n'
        '<circle cx="330" cy="60" r="90" fill="#fff" opacity=".12"/>\n'
        '<circle cx="40" cy="250" r="70" fill="#fff" opacity=".08"/>\n'
        # The drawings are made on a 400 x 300 grid around (200, 170); shown a little larger.
        '<g transform="translate(200 170) scale(1.18) translate(-200 -170)">\n'
        '<ellipse cx="200" cy="258" rx="112" ry="10" fill="#000" opacity=".14"/>\n'
        f"{picture.draw()}"
        "</g>\n</svg>\n"
    )


def _speckles(seed: int, box: tuple[int, int, int, int], colour: str, count: int) -> str:
    """Dots scattered over a box (deterministic: the same file every time)."""
    rng = random.Random(seed)
    x0, y0, x1, y1 = box
    return "".join(
        f'<circle cx="{rng.uniform(x0, x1):.1f}" cy="{rng.uniform(y0, y1):.1f}" '
        f'r="{rng.uniform(1.2, 3.0):.1f}" fill="{colour}"/>'
        for _ in range(count)
    )


def _steam() -> str:
    return (
        '<g fill="none" stroke="#fff" stroke-width="5" stroke-linecap="round" opacity=".75">'
        '<path d="M170 88 c-10 -14 10 -22 0 -36"/><path d="M192 84 c-10 -14 10 -22 0 -40"/>'
        '<path d="M214 88 c-10 -14 10 -22 0 -36"/></g>\n'
    )


def _leaf(x: float, y: float, angle: float, colour: str, size: float = 1.0) -> str:
    return (
        f'<g transform="translate({x} {y}) rotate({angle}) scale({size})">'
        f'<path d="M0 0 C12 -14 34 -14 46 0 C34 14 12 14 0 0 Z" fill="{colour}" '
        f'stroke="{INK}" stroke-width="1.5"/>'
        f'<path d="M2 0 H42" stroke="{INK}" stroke-width="1" opacity=".5"/></g>'
    )


def _bean(x: float, y: float, angle: float, colour: str = "#5a3522") -> str:
    return (
        f'<g transform="translate({x} {y}) rotate({angle})">'
        f'<ellipse rx="11" ry="7.5" fill="{colour}" stroke="{INK}" stroke-width="1.5"/>'
        f'<path d="M-9 0 C-3 -4 3 4 9 0" fill="none" stroke="{INK}" stroke-width="1.5"/></g>'
    )


def _flower(x: float, y: float, petals: str, heart: str, size: float = 1.0) -> str:
    leaves = "".join(
        f'<ellipse cx="0" cy="-11" rx="5.5" ry="10" fill="{petals}" stroke="{INK}" '
        f'stroke-width="1" transform="rotate({angle})"/>'
        for angle in range(0, 360, 45)
    )
    return (
        f'<g transform="translate({x} {y}) scale({size})">{leaves}'
        f'<circle r="6.5" fill="{heart}" stroke="{INK}" stroke-width="1"/></g>'
    )


# -- mugs -----------------------------------------------------------------------------------------


def _mug(
    body: str,
    *,
    drink: str = "#4a2a1a",
    rim: str | None = None,
    decoration: str = "",
    handle: str | None = None,
    steam: bool = True,
    glass: bool = False,
) -> str:
    rim = rim or body
    handle = handle or body
    outline = f'stroke="{INK}" stroke-width="3"'
    fill_opacity = ' fill-opacity=".35"' if glass else ""
    handle_opacity = ' stroke-opacity=".6"' if glass else ""
    parts = [
        _steam() if steam else "",
        f'<path d="M248 138 C306 132 306 222 248 216" fill="none" stroke="{INK}" '
        'stroke-width="22" stroke-linecap="round"/>',
        f'<path d="M248 138 C306 132 306 222 248 216" fill="none" stroke="{handle}" '
        f'stroke-width="15" stroke-linecap="round"{handle_opacity}/>',
        f'<path d="M130 108 V222 Q130 252 160 252 H220 Q250 252 250 222 V108 Z" '
        f'fill="{body}"{fill_opacity} {outline}/>',
    ]
    if glass:
        parts.append(
            f'<path d="M142 128 V220 Q142 240 164 240 H216 Q238 240 238 220 V128 Z" '
            f'fill="{drink}" opacity=".9"/>'
        )
    parts += [
        decoration,
        '<path d="M146 124 V214" stroke="#fff" stroke-width="9" stroke-linecap="round" '
        'opacity=".35"/>',
        f'<ellipse cx="190" cy="108" rx="60" ry="13" fill="{rim}" {outline}/>',
        f'<ellipse cx="190" cy="110" rx="50" ry="8" fill="{drink}"/>',
    ]
    return "\n".join(parts) + "\n"


def _classic_mug() -> str:
    return _mug("#fbf8f2", rim="#fbf8f2")


def _enamel_mug() -> str:
    return _mug(
        "#2f5d8a",
        rim="#1f2a36",
        handle="#2f5d8a",
        decoration=_speckles(2, (136, 124, 244, 244), "#f4f1ea", 46)
        + '<path d="M131 236 Q131 251 160 251 H220 Q249 251 249 236" fill="none" '
        'stroke="#1f2a36" stroke-width="6"/>',
    )


def _glass_mug() -> str:
    return _mug("#ffffff", drink="#c9822b", rim="#ffffff", handle="#ffffff", glass=True) + (
        '<path d="M232 132 V214" stroke="#fff" stroke-width="5" stroke-linecap="round" '
        'opacity=".6"/>\n'
    )


def _speckled_mug() -> str:
    return _mug(
        "#8fae8d",
        rim="#efe6d2",
        handle="#8fae8d",
        decoration='<path d="M131 108 V140 Q160 148 190 140 T249 140 V108 Z" fill="#efe6d2"/>'
        + _speckles(4, (136, 146, 244, 246), "#4f5f4c", 38),
    )


def _travel_tumbler() -> str:
    return (
        f'<path d="M156 84 H244 L234 250 Q233 256 226 256 H174 Q167 256 166 250 Z" '
        f'fill="#2a9d8f" stroke="{INK}" stroke-width="3"/>\n'
        '<path d="M166 150 H234" stroke="#1f7a6f" stroke-width="16"/>\n'
        '<path d="M172 96 L178 240" stroke="#fff" stroke-width="8" stroke-linecap="round" '
        'opacity=".3"/>\n'
        f'<rect x="148" y="60" width="104" height="28" rx="8" fill="#3a3f44" stroke="{INK}" '
        'stroke-width="3"/>\n'
        f'<rect x="160" y="50" width="80" height="14" rx="6" fill="#50565c" stroke="{INK}" '
        'stroke-width="3"/>\n'
        '<rect x="206" y="53" width="22" height="6" rx="3" fill="#15191c"/>\n'
    )


def _espresso_set() -> str:
    saucers = ("#d9534f", "#f0ad4e", "#5bc0de", "#7fb069")

    def cup(x: float, y: float, saucer: str) -> str:
        return (
            f'<g transform="translate({x} {y}) scale(1.25) translate({-x} {-y})">'
            f'<ellipse cx="{x}" cy="{y + 34}" rx="40" ry="9" fill="{saucer}" stroke="{INK}" '
            'stroke-width="2.5"/>'
            f'<path d="M{x + 22} {y + 4} C{x + 44} {y + 2} {x + 44} {y + 26} {x + 20} {y + 24}" '
            f'fill="none" stroke="{INK}" stroke-width="9"/>'
            f'<path d="M{x + 22} {y + 4} C{x + 44} {y + 2} {x + 44} {y + 26} {x + 20} {y + 24}" '
            'fill="none" stroke="#fbf8f2" stroke-width="4"/>'
            f'<path d="M{x - 26} {y - 8} V{y + 18} Q{x - 26} {y + 34} {x - 8} {y + 34} '
            f'H{x + 8} Q{x + 26} {y + 34} {x + 26} {y + 18} V{y - 8} Z" fill="#fbf8f2" '
            f'stroke="{INK}" stroke-width="2.5"/>'
            f'<ellipse cx="{x}" cy="{y - 8}" rx="26" ry="6" fill="#3b2013" stroke="{INK}" '
            'stroke-width="2.5"/>'
            f'<ellipse cx="{x - 4}" cy="{y - 9}" rx="12" ry="2.5" fill="#b27a4b"/></g>'
        )

    spots = ((148, 132), (254, 132), (148, 208), (254, 208))
    return "\n".join(cup(x, y, s) for (x, y), s in zip(spots, saucers, strict=True)) + "\n"


# -- tea ------------------------------------------------------------------------------------------


def _tin(
    body: str, *, lid: str, label: str, words: str, ornament: str, words_colour: str = INK
) -> str:
    outline = f'stroke="{INK}" stroke-width="3"'
    return (
        f'<path d="M142 100 V238 Q142 254 200 254 Q258 254 258 238 V100 Z" fill="{body}" '
        f"{outline}/>\n"
        f'<rect x="142" y="138" width="116" height="82" fill="{label}" stroke="{INK}" '
        'stroke-width="2"/>\n'
        f'<text x="200" y="210" text-anchor="middle" font-family="Georgia, serif" '
        f'font-size="13" font-weight="700" letter-spacing="1.5" fill="{words_colour}">'
        f"{escape(words)}</text>\n"
        f"{ornament}\n"
        '<path d="M154 108 V240" stroke="#fff" stroke-width="8" stroke-linecap="round" '
        'opacity=".25"/>\n'
        f'<path d="M136 84 V106 Q136 118 200 118 Q264 118 264 106 V84 Z" fill="{lid}" '
        f"{outline}/>\n"
        f'<ellipse cx="200" cy="84" rx="64" ry="12" fill="{lid}" {outline}/>\n'
        '<ellipse cx="190" cy="82" rx="34" ry="4" fill="#fff" opacity=".35"/>\n'
    )


def _earl_grey() -> str:
    return _tin(
        "#27345c",
        lid="#c9a24a",
        label="#f4ecd8",
        words="EARL GREY",
        ornament=_flower(200, 170, "#4f7fd9", "#27345c", 1.05),
    ) + _flower(96, 226, "#4f7fd9", "#f4ecd8", 0.9)


def _sencha() -> str:
    leaves = "".join(
        _leaf(x, y, a, "#6da34d", s)
        for x, y, a, s in ((70, 220, -20, 1.1), (282, 232, 10, 1.0), (300, 196, -40, 0.8))
    )
    return (
        _tin(
            "#3f7d4e",
            lid="#2b5a37",
            label="#eef5e4",
            words="SENCHA",
            ornament=_leaf(176, 172, -15, "#6da34d", 1.05),
        )
        + leaves
    )


def _star_anise(x: float, y: float, size: float = 1.0) -> str:
    arms = "".join(
        f'<path d="M0 0 L-6 -20 Q0 -28 6 -20 Z" fill="#7a3b1d" stroke="{INK}" stroke-width="1.2" '
        f'transform="rotate({angle})"/>'
        for angle in range(0, 360, 45)
    )
    return (
        f'<g transform="translate({x} {y}) scale({size})">{arms}<circle r="4" fill="#3d1d0e"/></g>'
    )


def _masala_chai() -> str:
    cinnamon = (
        f'<g transform="translate(282 236) rotate(-12)"><rect x="-40" y="-7" width="80" '
        f'height="14" rx="7" fill="#a0592b" stroke="{INK}" stroke-width="2"/>'
        '<path d="M-36 0 H36" stroke="#6e3817" stroke-width="2"/></g>'
    )
    return (
        _tin(
            "#b23a2b",
            lid="#d9a441",
            label="#fbe9c6",
            words="MASALA CHAI",
            ornament=_star_anise(200, 170, 1.0),
        )
        + cinnamon
        + _star_anise(94, 232, 0.8)
    )


def _chamomile() -> str:
    # A kraft stand-up pouch with a window full of blossoms.
    pouch = (
        f'<path d="M138 80 H262 L270 246 Q270 254 262 254 H138 Q130 254 130 246 Z" '
        f'fill="#c9a878" stroke="{INK}" stroke-width="3"/>\n'
        '<path d="M138 92 H262" stroke="#a8875a" stroke-width="3" stroke-dasharray="6 4"/>\n'
        f'<rect x="158" y="120" width="84" height="74" rx="37" fill="#fff8d6" stroke="{INK}" '
        'stroke-width="2"/>\n'
        + _flower(186, 146, "#ffffff", "#f2b705", 0.8)
        + _flower(214, 168, "#ffffff", "#f2b705", 0.8)
        + '\n<text x="200" y="226" text-anchor="middle" font-family="Georgia, serif" '
        f'font-size="13" font-weight="700" letter-spacing="1.5" fill="{INK}">CHAMOMILE</text>\n'
    )
    return (
        pouch + _flower(88, 222, "#ffffff", "#f2b705", 1.1) + _flower(310, 230, "#fff", "#f2b705")
    )


def _jasmine_pearls() -> str:
    rng = random.Random(11)
    spots = [
        (x, y)
        for row, y in enumerate(range(164, 126, -12))
        for x in range(146 + row * 14, 256 - row * 14, 17)
    ]
    pearls = "".join(
        f'<circle cx="{x + rng.uniform(-3, 3):.1f}" cy="{y + rng.uniform(-3, 3):.1f}" r="9" '
        f'fill="{rng.choice(("#6b8f3c", "#7da34a", "#5c7d33"))}" stroke="{INK}" '
        'stroke-width="1.2"/>'
        for x, y in spots
    )
    return (
        pearls + f'\n<path d="M120 160 H280 Q276 238 200 244 Q124 238 120 160 Z" fill="#f7f1e6" '
        f'stroke="{INK}" stroke-width="3"/>\n'
        '<path d="M138 180 Q200 200 262 180" fill="none" stroke="#3f7fb5" stroke-width="4"/>\n'
        '<path d="M150 206 Q200 222 250 206" fill="none" stroke="#3f7fb5" stroke-width="3"/>\n'
        + _flower(96, 120, "#ffffff", "#f6d365", 1.0)
        + _flower(306, 132, "#ffffff", "#f6d365", 0.85)
        + _leaf(268, 236, -10, "#6da34d", 0.8)
    )


def _rooibos_vanilla() -> str:
    pod = (
        f'<g transform="translate(276 232) rotate(-18)">'
        f'<path d="M-60 0 Q0 -9 60 -2 Q0 9 -60 0 Z" fill="#3b2414" stroke="{INK}" '
        'stroke-width="2"/><path d="M-54 0 Q0 -3 54 -1" stroke="#6b4a2d" stroke-width="1.5"/></g>'
    )
    flower = (
        '<g transform="translate(200 170)">'
        + "".join(
            f'<ellipse cy="-12" rx="6" ry="12" fill="#f2e3b3" stroke="{INK}" stroke-width="1" '
            f'transform="rotate({angle})"/>'
            for angle in range(0, 360, 72)
        )
        + '<circle r="5" fill="#d99b2b"/></g>'
    )
    return _tin("#a4452c", lid="#5e2a1a", label="#f7e7d0", words="ROOIBOS", ornament=flower) + pod


# -- coffee ---------------------------------------------------------------------------------------


def _bag(body: str, *, label: str, words: str, emblem: str, words_colour: str = INK) -> str:
    outline = f'stroke="{INK}" stroke-width="3"'
    return (
        f'<path d="M146 78 H254 L262 244 Q262 254 252 254 H148 Q138 254 138 244 Z" '
        f'fill="{body}" {outline}/>\n'
        f'<rect x="142" y="66" width="116" height="22" rx="3" fill="{body}" {outline}/>\n'
        '<path d="M150 77 H250" stroke="#000" stroke-width="2" stroke-dasharray="4 4" '
        'opacity=".3"/>\n'
        f'<circle cx="234" cy="108" r="7" fill="#fff" fill-opacity=".5" stroke="{INK}" '
        'stroke-width="2"/>\n'
        f'<rect x="156" y="128" width="88" height="100" rx="6" fill="{label}" stroke="{INK}" '
        'stroke-width="2"/>\n'
        f"{emblem}\n"
        f'<text x="200" y="216" text-anchor="middle" font-family="Georgia, serif" '
        f'font-size="12" font-weight="700" letter-spacing="1" fill="{words_colour}">'
        f"{escape(words)}</text>\n"
        '<path d="M152 96 L158 240" stroke="#fff" stroke-width="7" stroke-linecap="round" '
        'opacity=".22"/>\n'
    )


def _house_espresso() -> str:
    spilled = "".join(
        _bean(x, y, a)
        for x, y, a in ((96, 244, 20), (120, 252, -30), (292, 246, 60), (314, 238, 10))
    )
    return (
        _bag(
            "#b98b5e",
            label="#2b211d",
            words="ESPRESSO",
            words_colour="#f4e3c8",
            emblem=_bean(200, 168, -30, "#c98d5a"),
        )
        + spilled
    )


def _ethiopia() -> str:
    return _bag(
        "#e8b83f",
        label="#fffaf0",
        words="ETHIOPIA",
        emblem=_flower(200, 168, "#e87461", "#f2b705", 1.1),
    ) + _bean(300, 244, 30)


def _colombia() -> str:
    mountains = (
        f'<path d="M164 196 L186 160 L200 178 L216 150 L238 196 Z" fill="#4f7a4a" '
        f'stroke="{INK}" stroke-width="2"/>'
        '<path d="M210 160 L216 150 L222 160 Z" fill="#fff"/>'
        '<circle cx="180" cy="146" r="8" fill="#e8a33f"/>'
    )
    return _bag("#35654a", label="#f5ecd9", words="HUILA", emblem=mountains) + _bean(100, 246, -20)


def _decaf() -> str:
    night = (
        '<circle cx="200" cy="168" r="26" fill="#f2d98c"/>'
        '<circle cx="212" cy="160" r="24" fill="#2d3a5e"/>'
        '<circle cx="172" cy="146" r="2" fill="#f2d98c"/><circle cx="226" cy="190" r="2" '
        'fill="#f2d98c"/><circle cx="232" cy="142" r="1.6" fill="#f2d98c"/>'
    )
    return _bag(
        "#d9d2e9", label="#2d3a5e", words="DECAF", words_colour="#f2d98c", emblem=night
    ) + _bean(296, 246, 40)


def _cold_brew() -> str:
    cubes = "".join(
        f'<rect x="{x}" y="{y}" width="26" height="26" rx="5" fill="#e9f6fb" fill-opacity=".75" '
        f'stroke="#ffffff" stroke-width="2" transform="rotate({a} {x + 13} {y + 13})"/>'
        for x, y, a in ((166, 140, 12), (204, 152, -10), (182, 182, 25))
    )
    return (
        f'<path d="M150 110 Q150 92 168 90 V70 H232 V90 Q250 92 250 110 V240 Q250 254 236 254 '
        f'H164 Q150 254 150 240 Z" fill="#ffffff" fill-opacity=".35" stroke="{INK}" '
        'stroke-width="3"/>\n'
        '<path d="M158 128 H242 V238 Q242 246 234 246 H166 Q158 246 158 238 Z" fill="#3b2013"/>\n'
        + cubes
        + f'\n<rect x="164" y="58" width="72" height="18" rx="4" fill="#2b211d" stroke="{INK}" '
        'stroke-width="3"/>\n'
        '<rect x="170" y="206" width="60" height="26" rx="4" fill="#f4ecd8"/>\n'
        '<text x="200" y="224" text-anchor="middle" font-family="Georgia, serif" '
        f'font-size="9" font-weight="700" fill="{INK}">COLD BREW</text>\n'
        + _bean(300, 244, 30)
        + _bean(96, 240, -40)
    )


def _instant_sticks() -> str:
    colours = ("#d94f30", "#2b211d", "#d94f30", "#f0ad4e", "#2b211d", "#d94f30")
    sticks = "".join(
        f'<g transform="rotate({-30 + i * 12} 200 250)">'
        f'<rect x="188" y="74" width="24" height="170" rx="5" fill="{colour}" stroke="{INK}" '
        'stroke-width="2.5"/>'
        '<rect x="188" y="74" width="24" height="16" rx="3" fill="#fff" opacity=".35"/>'
        f'<path d="M193 150 H207" stroke="#fff" stroke-width="3" opacity=".7"/></g>'
        for i, colour in enumerate(colours)
    )
    return sticks + "\n"


# -- accessories ----------------------------------------------------------------------------------


def _dripper() -> str:
    return (
        f'<path d="M150 190 H250 V236 Q250 254 232 254 H168 Q150 254 150 236 Z" '
        f'fill="#ffffff" fill-opacity=".4" stroke="{INK}" stroke-width="3"/>\n'
        '<path d="M154 214 H246 V236 Q246 250 232 250 H168 Q154 250 154 236 Z" fill="#5a2f1c"/>\n'
        '<path d="M200 176 V204" stroke="#5a2f1c" stroke-width="4" stroke-linecap="round"/>\n'
        f'<ellipse cx="200" cy="178" rx="66" ry="10" fill="#f4f0ea" stroke="{INK}" '
        'stroke-width="3"/>\n'
        f'<path d="M130 90 H270 L224 172 H176 Z" fill="#f4f0ea" stroke="{INK}" '
        'stroke-width="3"/>\n'
        '<path d="M148 104 L184 166" stroke="#d6cfc4" stroke-width="3"/>\n'
        '<path d="M252 104 L216 166" stroke="#d6cfc4" stroke-width="3"/>\n'
        f'<ellipse cx="200" cy="90" rx="70" ry="12" fill="#e4dccf" stroke="{INK}" '
        'stroke-width="3"/>\n'
        '<ellipse cx="200" cy="92" rx="56" ry="7" fill="#6b3a22"/>\n'
    )


def _filters() -> str:
    def paper(dx: float, dy: float, angle: float) -> str:
        return (
            f'<g transform="translate({dx} {dy}) rotate({angle} 200 170)">'
            f'<path d="M132 110 H268 L232 232 H168 Z" fill="#e9d7b8" stroke="{INK}" '
            'stroke-width="2.5"/>'
            '<path d="M168 232 H232 L234 222 H166 Z" fill="#d7bf98"/>'
            '<path d="M140 120 H260" stroke="#c9b08a" stroke-width="2" '
            'stroke-dasharray="3 3"/></g>'
        )

    return paper(-26, 10, -8) + paper(0, 4, 0) + paper(26, 10, 8) + "\n"


def _grinder() -> str:
    return (
        f'<rect x="156" y="120" width="88" height="132" rx="10" fill="#c0c6cc" stroke="{INK}" '
        'stroke-width="3"/>\n'
        '<path d="M164 134 V240" stroke="#fff" stroke-width="8" stroke-linecap="round" '
        'opacity=".45"/>\n'
        '<rect x="156" y="176" width="88" height="22" fill="#7b4a2a"/>\n'
        f'<rect x="150" y="104" width="100" height="22" rx="6" fill="#8e969e" stroke="{INK}" '
        'stroke-width="3"/>\n'
        '<rect x="194" y="70" width="12" height="36" fill="#5e666e"/>\n'
        f'<path d="M200 74 L290 62" stroke="{INK}" stroke-width="11" stroke-linecap="round"/>\n'
        '<path d="M200 74 L290 62" stroke="#8e969e" stroke-width="6" stroke-linecap="round"/>\n'
        f'<ellipse cx="292" cy="50" rx="13" ry="18" fill="#7b4a2a" stroke="{INK}" '
        'stroke-width="3"/>\n'
        f'<circle cx="200" cy="74" r="9" fill="#5e666e" stroke="{INK}" stroke-width="3"/>\n'
        + _bean(110, 246, 20)
        + _bean(130, 236, -40)
    )


def _kettle() -> str:
    return (
        f'<path d="M138 246 Q126 180 160 140 H240 Q274 180 262 246 Z" fill="#2f3437" '
        f'stroke="{INK}" stroke-width="3"/>\n'
        '<path d="M156 160 Q144 200 150 236" stroke="#fff" stroke-width="7" fill="none" '
        'stroke-linecap="round" opacity=".25"/>\n'
        f'<path d="M146 226 Q96 226 88 170 Q84 140 62 124" fill="none" stroke="{INK}" '
        'stroke-width="13" stroke-linecap="round"/>\n'
        '<path d="M146 226 Q96 226 88 170 Q84 140 62 124" fill="none" stroke="#2f3437" '
        'stroke-width="7" stroke-linecap="round"/>\n'
        f'<path d="M250 160 Q300 160 300 200 Q300 236 258 236" fill="none" stroke="{INK}" '
        'stroke-width="15" stroke-linecap="round"/>\n'
        '<path d="M250 160 Q300 160 300 200 Q300 236 258 236" fill="none" stroke="#b07a4a" '
        'stroke-width="9" stroke-linecap="round"/>\n'
        f'<ellipse cx="200" cy="140" rx="42" ry="9" fill="#3c4246" stroke="{INK}" '
        'stroke-width="3"/>\n'
        f'<circle cx="200" cy="126" r="9" fill="#b07a4a" stroke="{INK}" stroke-width="3"/>\n'
        '<rect x="140" y="238" width="120" height="10" rx="4" fill="#1c2022"/>\n'
    )


def _infuser() -> str:
    holes = "".join(
        f'<circle cx="{x}" cy="{y}" r="2.6" fill="#6f7780"/>'
        for x in range(168, 236, 11)
        for y in range(168, 234, 11)
        if (x - 200) ** 2 + (y - 200) ** 2 < 30**2
    )
    return (
        f'<path d="M200 168 C200 120 240 100 268 80" fill="none" stroke="{INK}" '
        'stroke-width="5" stroke-dasharray="2 5" stroke-linecap="round"/>\n'
        f'<path d="M262 68 Q286 60 286 86" fill="none" stroke="{INK}" stroke-width="5" '
        'stroke-linecap="round"/>\n'
        f'<circle cx="200" cy="200" r="38" fill="#d5dbe0" stroke="{INK}" stroke-width="3"/>\n'
        + holes
        + f'\n<path d="M162 200 H238" stroke="{INK}" stroke-width="3"/>\n'
        '<path d="M178 178 Q188 170 200 168" fill="none" stroke="#fff" stroke-width="5" '
        'stroke-linecap="round" opacity=".7"/>\n'
        + _leaf(94, 230, -10, "#6da34d", 0.9)
        + _leaf(270, 240, -30, "#6da34d", 0.8)
    )


def _scale() -> str:
    return (
        f'<path d="M104 206 H296 L306 240 Q306 250 296 250 H104 Q94 250 94 240 Z" '
        f'fill="#2f3437" stroke="{INK}" stroke-width="3"/>\n'
        f'<rect x="112" y="190" width="176" height="18" rx="5" fill="#c0c6cc" stroke="{INK}" '
        'stroke-width="3"/>\n'
        f'<rect x="168" y="218" width="64" height="22" rx="3" fill="#9fe07a" stroke="{INK}" '
        'stroke-width="2"/>\n'
        '<text x="200" y="234" text-anchor="middle" font-family="monospace" font-size="14" '
        'font-weight="700" fill="#1b3a12">0.0 g</text>\n'
        '<circle cx="130" cy="229" r="6" fill="#d94f30"/><circle cx="270" cy="229" r="6" '
        'fill="#5e666e"/>\n'
        f'<path d="M164 190 V140 H236 V190" fill="#ffffff" fill-opacity=".4" stroke="{INK}" '
        'stroke-width="3"/>\n'
        '<path d="M166 160 H234 V188 H166 Z" fill="#5a2f1c"/>\n'
    )


PICTURES: dict[str, Picture] = {
    "p-001": Picture(backdrop=("#e9b48a", "#d07f52"), draw=_classic_mug),
    "p-002": Picture(backdrop=("#d3e6f1", "#9cc3dc"), draw=_enamel_mug),
    "p-003": Picture(backdrop=("#4b7f86", "#2f5f66"), draw=_glass_mug),
    "p-004": Picture(backdrop=("#f3ead8", "#dcc7a2"), draw=_speckled_mug),
    "p-005": Picture(backdrop=("#fbd9c4", "#f1a98a"), draw=_travel_tumbler),
    "p-006": Picture(backdrop=("#6b463a", "#3e261d"), draw=_espresso_set),
    "p-007": Picture(backdrop=("#e2dcf2", "#b9b0dd"), draw=_earl_grey),
    "p-008": Picture(backdrop=("#e6f2d9", "#bcd9a2"), draw=_sencha),
    "p-009": Picture(backdrop=("#f8dfab", "#eeb75e"), draw=_masala_chai),
    "p-010": Picture(backdrop=("#fbf3c4", "#ecd56a"), draw=_chamomile),
    "p-011": Picture(backdrop=("#f6dde4", "#e5abbd"), draw=_jasmine_pearls),
    "p-012": Picture(backdrop=("#f6e2cf", "#e2b08a"), draw=_rooibos_vanilla),
    "p-013": Picture(backdrop=("#8a4a31", "#5a2c1d"), draw=_house_espresso),
    "p-014": Picture(backdrop=("#3f6f6b", "#294b48"), draw=_ethiopia),
    "p-015": Picture(backdrop=("#f1e4cf", "#dcbf94"), draw=_colombia),
    "p-016": Picture(backdrop=("#9fb4d9", "#5f77a8"), draw=_decaf),
    "p-017": Picture(backdrop=("#d6eef5", "#98cde0"), draw=_cold_brew),
    "p-018": Picture(backdrop=("#fde9a9", "#f5c443"), draw=_instant_sticks),
    "p-019": Picture(backdrop=("#d3eee1", "#8fcaae"), draw=_dripper),
    "p-020": Picture(backdrop=("#d9e2ea", "#a6b9c9"), draw=_filters),
    "p-021": Picture(backdrop=("#f0d2b3", "#d39a69"), draw=_grinder),
    "p-022": Picture(backdrop=("#e2ead9", "#b3c7a3"), draw=_kettle),
    "p-023": Picture(backdrop=("#d9f0e6", "#a2d6bd"), draw=_infuser),
    "p-024": Picture(backdrop=("#e6e6ee", "#b6b8c9"), draw=_scale),
}


def picture_svg(product_id: str) -> str:
    """The SVG of a demo product's picture (KeyError for another id)."""
    names = {p["product_id"]: p["name"] for p in DEMO_PRODUCTS}
    return _frame(names[product_id], PICTURES[product_id])


def write_pictures(directory: Path = PRODUCTS_DIR) -> list[Path]:
    """Write every picture as `<product id>.svg` into `directory`; the files written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for product_id in PICTURES:
        path = directory / f"{product_id}.svg"
        path.write_text(picture_svg(product_id), encoding="utf-8")
        written.append(path)
    return written


if __name__ == "__main__":
    for written in write_pictures():
        print(written)
