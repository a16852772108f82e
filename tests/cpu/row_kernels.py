"""What the few-row (decode) kernels' tests check alike: a row's bits do not depend on its
batch-mates or on the thread count."""
import torch


def assert_each_row_alone_and_any_thread_count_give(run, x, out):
    """run(rows) -> the kernel's result for x's rows: with 1, 2 and 3 threads, all of x and each
    row of it alone give `out`'s bits."""
    threads = torch.get_num_threads()
    try:
        for count in (1, 2, 3):
            for r in [None, *range(x.shape[0])]:
                torch.set_num_threads(count)  # each call: the ops' thread governor takes a count set just before
                if r is None:
                    assert torch.equal(run(x), out)
                else:
                    assert torch.equal(run(x[r:r + 1])[0], out[r])
    finally:
        torch.set_num_threads(threads)
