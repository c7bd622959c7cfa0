//! The structure of a family's blocks, as passes may rely on it without matching on weight names.

/// What passes may know of a family's block type (LLaMA's, BERT's) without matching on names.
pub trait BlockLayout {
    /// The block's Linears by the stage of its layer-wise forward (the blocks' `stage`) whose output they
    /// read: stage s's Linears share one input. Flattened, the order of the block's `linears` and
    /// `linears_mut` (a test checks it).
    const STAGES: &'static [&'static [&'static str]];
    /// The start of every block's names, before the block index: `model.layers.`.
    const PREFIX: &'static str;

    /// Block `i`'s name prefix: `model.layers.3.`.
    fn prefix(i: usize) -> String {
        format!("{}{i}.", Self::PREFIX)
    }
}
