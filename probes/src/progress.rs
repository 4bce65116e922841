//! How a long-running library call tells its caller how far it has got. Libraries only report;
//! the binary decides how to show it (a live bar on a terminal, sparse lines in a log).
//!
//! A run is a sequence of steps ([`Report::step`]); a step that takes long (training an SAE,
//! generating a corpus) is a phase with a count of units ([`Report::phase`], then
//! [`Report::advance`] and [`Report::phase_done`]), announced with its cost up front.
//! Any `FnMut(&str)` is a `Report` that is told the steps and a line per phase.

/// Receives the progress of a run.
pub trait Report {
    /// The run moved on to the step `what` (a name such as `policy / check`).
    fn step(&mut self, what: &str);

    /// A long phase starts: `total` units of `unit` (for example 400 `windows`) when known;
    /// `notice` says what it costs, for the up-front line ("about 25 min on 2 cores").
    fn phase(&mut self, what: &str, total: Option<u64>, unit: &str, notice: Option<&str>);

    /// `done` units of the current phase are done (a running count, not an increment).
    fn advance(&mut self, done: u64);

    /// The current phase is over.
    fn phase_done(&mut self);
}

/// A closure hears the steps, and each phase once as a step of its own.
impl<F: FnMut(&str)> Report for F {
    fn step(&mut self, what: &str) {
        self(what)
    }

    fn phase(&mut self, what: &str, _total: Option<u64>, _unit: &str, notice: Option<&str>) {
        match notice {
            Some(n) => self(&format!("{what} ({n})")),
            None => self(what),
        }
    }

    fn advance(&mut self, _done: u64) {}

    fn phase_done(&mut self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_closure_hears_steps_and_phases_once() {
        let mut heard = Vec::new();
        let mut f = |s: &str| heard.push(s.to_string());
        let r: &mut dyn Report = &mut f;
        r.step("a / b");
        r.phase("training", Some(10), "steps", Some("about 1 min"));
        r.advance(5);
        r.phase_done();
        assert_eq!(heard, ["a / b", "training (about 1 min)"]);
    }
}
