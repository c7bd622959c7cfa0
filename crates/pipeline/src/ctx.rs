//! What a stage needs from whoever runs it besides the model and its config: progress bars and a place for
//! the lines a user reads while it works.

/// A progress callback: `(done, total)`.
pub type Progress = Box<dyn FnMut(usize, usize)>;

/// The run context of a stage. The CLI draws progress bars and writes notes to stderr; tests and the server
/// use [`Ctx::quiet`].
pub struct Ctx {
    progress: Box<dyn Fn(&str) -> Progress>,
    note: Box<dyn Fn(&str)>,
    step: Box<dyn Fn(&str)>,
}

impl Ctx {
    /// `progress(what)` makes a callback for one phase; `note` takes side remarks (calibration sources,
    /// timings); `step` takes the lines of a progressive schedule as each step ends.
    pub fn new(
        progress: impl Fn(&str) -> Progress + 'static,
        note: impl Fn(&str) + 'static,
        step: impl Fn(&str) + 'static,
    ) -> Self {
        Self { progress: Box::new(progress), note: Box::new(note), step: Box::new(step) }
    }

    /// No progress, no notes.
    pub fn quiet() -> Self {
        Self::new(|_| Box::new(|_, _| {}), |_| {}, |_| {})
    }

    /// A progress callback for the phase `what`.
    pub fn progress(&self, what: &str) -> Progress {
        (self.progress)(what)
    }

    pub fn note(&self, line: &str) {
        (self.note)(line)
    }

    pub fn step(&self, line: &str) {
        (self.step)(line)
    }
}
