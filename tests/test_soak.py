"""The soak's short form (`make soak` runs 1,000 requests): mixed text / image / video / JSON-schema requests
against a real `nvila serve` process: no failure, no memory growth after warm-up, 429s beyond the queue bound."""

from __future__ import annotations

import pytest
from conftest import CHECKPOINTS

from nvila.base.errors import NvilaError
from nvila.serve.soak import SoakConfig, check_reply, default_media, soak, verdict


@pytest.mark.slow
def test_short_soak_passes() -> None:
    image, video = default_media()
    cfg = SoakConfig(str(CHECKPOINTS / "nvila-lite"), image, video, requests=160, concurrency=8, warm=60,
                     max_tokens=8, max_queue=16)
    report = soak(cfg)
    assert verdict(report, max_growth=0.10) == [], report
    assert report["failures"] == 0 and sum(k["n"] for k in report["by_kind"].values()) == 160
    assert all(k["n"] == 40 for k in report["by_kind"].values())
    assert report["overload"]["rejected_429"] > 0 and report["overload"]["ok"] > 0


def test_verdict_names_every_problem() -> None:
    report = {"failures": 2, "failure_examples": ["request 3 (image): HTTP 500"], "rss_growth_after_warm": 0.25,
              "overload": {"sent": 40, "ok": 40, "rejected_429": 0, "other": 0}, "healthy_after": False}
    problems = verdict(report)
    assert len(problems) == 4 and "HTTP 500" in problems[0] and "25.0 %" in problems[1]


def test_constrained_reply_is_checked() -> None:
    reply = {"choices": [{"finish_reason": "stop", "message": {"content": '{"answer": "x"}'}}]}
    assert "keys" in check_reply("json_schema", reply)
    reply["choices"][0]["message"]["content"] = '{"answer": "x", "confidence": 0.5}'
    assert check_reply("json_schema", reply) is None
    reply["choices"][0]["finish_reason"] = "length"
    reply["choices"][0]["message"]["content"] = '{"answer": "x'
    assert check_reply("json_schema", reply) is None      # cut by max_tokens: reported as such, not claimed valid


def test_queue_bound_must_exceed_concurrency() -> None:
    image, video = default_media()
    with pytest.raises(NvilaError, match="must exceed the concurrency"):
        soak(SoakConfig("unused", image, video, concurrency=16, max_queue=16))
