"""`vlbot serve` with a platform that refuses it: one clear line naming the settings, no traceback."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from tests.fake_telegram import FakeTelegram
from tests.telegram_harness import fake_server

__all__ = ["fake_server"]


async def test_a_wrong_telegram_token_is_one_clear_line(fake: FakeTelegram, tmp_path: Path) -> None:
    wrong = "999999:WrongTokenWrongTokenWrongToken000"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLBOT_ENGINE": "ocr",
           "VLBOT_DATA_DIR": str(tmp_path / "data"), "VLBOT_TELEGRAM__TOKEN": wrong,
           "VLBOT_TELEGRAM__BASE_URL": fake.base_url,
           "VLBOT_TELEGRAM__BASE_FILE_URL": fake.base_file_url}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot.cli", "serve", env=env, cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 2
    last = err.decode().strip().splitlines()[-1]
    assert last.startswith("vlbot: the telegram adapter could not start:"), last
    assert "VLBOT_TELEGRAM__" in last
    assert "Traceback" not in err.decode()
    assert wrong not in err.decode() + out.decode()  # the token never printed
