//! P3: memory of `handler` against the echo baseline: RSS idle after start, and the peak
//! (VmHWM) after the P2 and R4 runs on the same two processes.

use crate::procs::{memory_kib, Proc};
use crate::report::{mib, row, Row};

/// RSS of both processes right after start.
pub fn idle(ours: &Proc, base: &Proc, rows: &mut Vec<Row>) {
    let (idle, _) = memory_kib(ours.pid());
    let (base_idle, _) = memory_kib(base.pid());
    rows.push(
        row("P3", "RSS idle after start", mib(idle))
            .base(mib(base_idle))
            .target("≤ 15 MB", idle * 1024 <= 15_000_000),
    );
}

/// Peak RSS of both processes so far (call after P2 and R4).
pub fn peak(ours: &Proc, base: &Proc, rows: &mut Vec<Row>) {
    let (_, peak) = memory_kib(ours.pid());
    let (_, base_peak) = memory_kib(base.pid());
    rows.push(
        row("P3", "peak RSS (VmHWM) after P2 + R4", mib(peak))
            .base(mib(base_peak))
            .target("≤ 40 MB", peak * 1024 <= 40_000_000),
    );
}
