"""anymoe/trainers/transfer.py on a GPU: a step's host batch reaches the device without the host
waiting for the kernels queued before the copy (a plain pageable copy waits for them: the trainer's
step waited 8.7 ms for the previous AdamW step), and the copied values are right."""

import pytest
import torch

from anymoe.core.backend import probe_backends
from anymoe.trainers.transfer import to_device, to_host_later

pytestmark = pytest.mark.gpu


def _busy_device():
    status = probe_backends()["cuda"]
    if not status.ok:
        pytest.skip(f"backend 'cuda' not usable here: {status.reason}")
    torch.cuda._sleep(int(2e9))  # ~1 s of one busy kernel ahead of everything queued next
    done = torch.cuda.Event()
    done.record()
    return done


def test_to_device_queues_the_copy_behind_running_kernels():
    host = torch.randint(0, 32000, (8, 2048))
    done = _busy_device()
    dev = to_device(host, torch.device("cuda"))
    assert not done.query()  # returned while the earlier kernel still runs: the host did not wait
    assert dev.is_cuda and torch.equal(dev.cpu(), host)
    assert done.query()


def test_plain_copy_waits_which_is_what_to_device_avoids():
    host = torch.randint(0, 32000, (8, 2048))
    done = _busy_device()
    host.to("cuda")
    assert done.query()  # the pageable copy waited for the sleeping kernel


def test_to_host_later_returns_at_once_and_reads_after_the_kernel():
    x = torch.arange(10, device="cuda", dtype=torch.float64)
    done = _busy_device()
    wait = to_host_later(x * 2)
    assert not done.query()
    assert torch.equal(wait(), torch.arange(10, dtype=torch.float64) * 2) and done.query()
