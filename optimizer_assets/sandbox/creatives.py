"""Creative traits and copy text of sandbox ads, and the businesses that run them.

Copy is assembled from the ad's traits (hook type, emotion, CTA) and the account's vertical
vocabulary with seeded picks, so the same seed always writes the same ads.
"""

from __future__ import annotations

import numpy as np

HOOK_TYPES = (
    "question",
    "statistic",
    "testimonial",
    "offer",
    "problem",
    "story",
    "curiosity",
    "authority",
)
FORMATS = ("image", "video", "carousel", "reel")
CTAS = ("LEARN_MORE", "SIGN_UP", "GET_QUOTE", "BOOK_NOW", "CONTACT_US", "APPLY_NOW")
EMOTIONS = ("urgency", "trust", "curiosity", "fear", "joy", "aspiration")

# vertical -> (service, thing, pain, result, offer, typical deal value in USD)
VERTICALS: dict[str, tuple[str, str, str, str, str, float]] = {
    "roofing": ("roof replacement", "roof", "leaks", "a storm-proof roof", "free inspection",
                14000),
    "solar": ("solar installation", "energy bill", "sky-high bills", "a $0 power bill",
              "free savings report", 18000),
    "remodeling": ("kitchen remodel", "kitchen", "a cramped layout", "the kitchen they wanted",
                   "free 3D design", 22000),
    "hvac": ("HVAC replacement", "AC", "breakdowns", "a quiet, efficient home", "$500 off", 9000),
    "dental": ("dental implants", "smile", "missing teeth", "a confident smile",
               "free consultation", 12000),
    "windows": ("window replacement", "windows", "drafts", "a cozy, quiet house",
                "buy 3 get 1 free", 11000),
    "pools": ("pool installation", "backyard", "boring summers", "a resort backyard",
              "free design visit", 26000),
    "landscaping": ("landscape design", "yard", "a patchy lawn", "a yard neighbors envy",
                    "free estimate", 8000),
    "legal": ("injury claim", "case", "unpaid medical bills", "the settlement they deserved",
              "free case review", 15000),
    "siding": ("siding replacement", "home exterior", "peeling paint", "curb appeal",
               "0% financing", 16000),
}  # fmt: skip
VERTICAL_NAMES = tuple(VERTICALS)

BRAND_WORDS = (
    "Summit", "Bright", "Evergreen", "Pioneer", "Harbor", "Keystone", "Liberty", "Northstar",
    "Redwood", "Bluebird", "Cornerstone", "Horizon", "Iron Oak", "Lakeside", "Maple", "Prairie",
    "Silverline", "Sterling", "Trident", "Westfield",
)  # fmt: skip
CITIES = (
    "Austin", "Denver", "Phoenix", "Tampa", "Raleigh", "Nashville", "Columbus", "Sacramento",
    "Charlotte", "Portland", "San Diego", "Atlanta", "Dallas", "Orlando", "Boise", "Tucson",
)  # fmt: skip
AUDIENCES = (
    "Homeowners 35-64", "Broad US", "Lookalike 1%", "Lookalike 3%", "Interest: home improvement",
    "Retargeting 30d", "Women 30-55", "Men 35-65", "Advantage+ audience",
)  # fmt: skip

_TITLES = {
    "question": "Still dealing with {pain}? Fix your {thing} this month",
    "statistic": "{pct}% of {city} homeowners overpay for {service}",
    "testimonial": '"Best decision we made" - {service} in {city}',
    "offer": "{offer_cap} on {service} - this month only",
    "problem": "{pain_cap} cost you more every month",
    "story": "How a {city} family got {result}",
    "curiosity": "The {service} trick most companies won't tell you",
    "authority": "{years} years, {count}+ {service} projects in {city}",
}
_EMOTION_LINES = {
    "urgency": "Spots for this month are almost gone.",
    "trust": "Licensed, insured and rated {rating} stars by your neighbors.",
    "curiosity": "See what changed for {count} local families.",
    "fear": "Waiting makes {pain} more expensive every week.",
    "joy": "Imagine coming home to {result}.",
    "aspiration": "You deserve {result}.",
}
_CTA_LINES = {
    "LEARN_MORE": "Learn how it works in 2 minutes.",
    "SIGN_UP": "Sign up for your {offer}.",
    "GET_QUOTE": "Get your quote today.",
    "BOOK_NOW": "Book your {offer} now.",
    "CONTACT_US": "Message us with any question.",
    "APPLY_NOW": "Apply now - approval takes minutes.",
}


def ad_copy(
    rng: np.random.Generator,
    vertical: np.ndarray,
    hook: np.ndarray,
    emotion: np.ndarray,
    cta: np.ndarray,
) -> tuple[list[str], list[str]]:
    """Titles and bodies for ads given trait codes; runs once per world build."""
    n = len(hook)
    pct = rng.integers(38, 83, n)
    years = rng.integers(8, 41, n)
    count = rng.integers(2, 50, n) * 50
    rating = np.round(rng.uniform(4.6, 5.0, n), 1)
    city = rng.integers(0, len(CITIES), n)
    titles: list[str] = []
    bodies: list[str] = []
    for i in range(n):  # one-time catalog build, not a hot path
        service, thing, pain, result, offer, _ = VERTICALS[VERTICAL_NAMES[vertical[i]]]
        words = {
            "service": service,
            "thing": thing,
            "pain": pain,
            "pain_cap": pain[:1].upper() + pain[1:],
            "result": result,
            "offer": offer,
            "offer_cap": offer[:1].upper() + offer[1:],
            "pct": int(pct[i]),
            "years": int(years[i]),
            "count": int(count[i]),
            "rating": float(rating[i]),
            "city": CITIES[city[i]],
        }
        titles.append(_TITLES[HOOK_TYPES[hook[i]]].format(**words))
        bodies.append(
            " ".join(
                (
                    _EMOTION_LINES[EMOTIONS[emotion[i]]].format(**words),
                    f"{service[:1].upper() + service[1:]} from a local team you can trust.",
                    _CTA_LINES[CTAS[cta[i]]].format(**words),
                )
            )
        )
    return titles, bodies
