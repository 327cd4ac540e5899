"""`tgops serve` leaves what its start-up made out of the garbage collector's later passes
(``gc.freeze``) and collects the youngest generation less often; a service started without
asking for it (as the tests start many in one process) changes neither."""

from __future__ import annotations

import gc
from pathlib import Path

from bot.service import Service
from core.heap import GC_YOUNG
from tests.service import settings_for


async def test_a_service_freezes_what_start_up_made_only_when_asked(tmp_path: Path) -> None:
    gc.unfreeze()
    before = gc.get_threshold()
    async with Service(settings_for(tmp_path)):
        assert gc.get_freeze_count() == 0
        assert gc.get_threshold() == before
    try:
        async with Service(settings_for(tmp_path), freeze=True) as service:
            assert gc.get_freeze_count() > 0
            assert service.port is not None
            # the youngest generation collected less often, the older ones as before
            assert gc.get_threshold() == (GC_YOUNG, *before[1:])
    finally:
        gc.unfreeze()
    assert gc.get_freeze_count() == 0
    assert gc.get_threshold() == before  # restored when the service ended
