"""What the simulated traffic is made of: models, service tiers, GPU types, the personas of
the accounts and the shares of what they do; and the random draws from them."""

from __future__ import annotations

import math
import random
import uuid
from datetime import timedelta
from decimal import Decimal

from ledger.demo.month import MONTH_START

FW = "accounts/fireworks/models/"
# (model, weight, output-length factor)
CHAT_MODELS = (
    (FW + "llama-v3p1-8b-instruct", 25, 1.0),
    (FW + "llama-v3p3-70b-instruct", 25, 1.0),
    (FW + "deepseek-v3", 14, 1.0),
    (FW + "qwen3-235b-a22b", 12, 1.5),
    (FW + "gpt-oss-120b", 12, 1.5),
    (FW + "deepseek-r1", 8, 4.0),
    (FW + "llama-v3p1-405b-instruct", 4, 1.0),
)
# Agents on large models with long contexts: about a dollar every four requests.
SCALEUP_MODELS = (
    (FW + "llama-v3p1-405b-instruct", 50, 1.0),
    (FW + "deepseek-r1", 50, 2.0),
)
# In the price book only from 2026-07: early adopters' March usage is journaled as unpriced.
UNPRICED_MODEL = FW + "kimi-k2-instruct"
UNPRICED_SHARE = 0.005
GLITCH_SHARE = 0.0004  # a meter reporting nonsense (10^12 tokens): the ledger rejects it
SERVICE_TIERS = (("standard", 80), ("batch", 15), ("priority", 5))
GPU_TYPES = (("A100-80GB", 30), ("H100-80GB", 45), ("H200-141GB", 15), ("B200-180GB", 10))
# (model, weight, meter, per-image quantity)
IMAGE_MODELS = (
    (FW + "flux-1-dev-fp8", 35, "steps", 28),
    (FW + "flux-1-schnell-fp8", 35, "steps", 4),
    (FW + "stable-diffusion-xl-1024-v1-0", 20, "steps", 30),
    (FW + "playground-v2-5-1024px-aesthetic", 10, "images", 1),
)
FINE_TUNE_MODELS = ((FW + "llama-v3p1-8b-instruct", 70), (FW + "llama-v3p3-70b-instruct", 30))
MAX_INPUT_TOKENS = 131_072
MAX_OUTPUT_TOKENS = 32_768

# Who the accounts are (shares of all accounts; counts are apportioned exactly, so even a
# small run has each kind).
PERSONAS = (
    ("trial", 0.26),  # tries a few requests, never adds a card, rarely uses up the $1
    ("free_heavy", 0.21),  # no card, uses up the $1 and is suspended; a few get goodwill
    ("upgrade", 0.13),  # no card, suspended when the $1 is gone, then adds a card
    ("prepaid", 0.06),  # no card, suspended, buys credits (and maybe again)
    ("payg", 0.20),  # adds a card early; some payments fail and get fixed
    ("gpu", 0.04),  # on-demand deployments billed hourly in GPU-seconds
    ("fine_tune", 0.03),  # fine-tuning jobs plus serverless use of the tuned model
    ("image", 0.04),  # image generation; half of them add a card
    ("scaleup", 0.03),  # a card and agents on large models: past the tier-1 spend limit
)
# Accounts that can run into their monthly spend limit, and react to it.
HEAVY = ("gpu", "fine_tune", "scaleup")
HOLD_SHARE = 0.02
PROMO_SHARE = 0.10  # accounts opened before PROMO_BEFORE get a launch promotion that expires
PROMO_BEFORE = MONTH_START + timedelta(days=19)
PROMO_DAYS = 7
CONFIGURED_LIMIT_SHARE = 0.25  # of HEAVY accounts: set their own (lower) monthly limit
SUPPORT_GOODWILL_SHARE = 0.05  # of payg accounts: a goodwill credit after an incident
REVOKE_SHARE = 0.3  # of goodwill grants: revoked a day or two later (granted in error)
NICE_AMOUNTS = tuple(Decimal(a) for a in ("50", "100", "250", "500", "1000", "5000", "10000"))


def random_uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def pick(rng: random.Random, options: tuple) -> tuple:
    return rng.choices(options, weights=[o[1] for o in options])[0]


def lognormal_int(rng: random.Random, median: float, sigma: float, low: int, high: int) -> int:
    return max(low, min(high, int(rng.lognormvariate(math.log(median), sigma))))
