"""Test-suite settings.

The unit tests use small models, where torch's intra-op threads cost more in synchronisation
than they gain (and oversubscribe a busy 2-core machine badly); one thread keeps the suite
fast and its timings stable. Set UNLEARN_TEST_THREADS to override.
"""

import os

import torch

torch.set_num_threads(int(os.environ.get("UNLEARN_TEST_THREADS", "1")))
