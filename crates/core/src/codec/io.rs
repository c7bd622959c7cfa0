//! What every codec shares: the form a tensor is written in ([`Stored`]) and where a Linear's tensors are
//! read from ([`LinearReader`]).

use candle_core::Tensor;

/// A tensor as it is written to disk: a candle tensor, or int8 data candle has no dtype for.
#[derive(Debug, Clone)]
pub enum Stored {
    Tensor(Tensor),
    I8 { shape: Vec<usize>, data: Vec<i8> },
}

/// Where a codec reads a Linear's tensors from. Names are full Hugging Face names (`…q_proj.weight_packed`);
/// the reader maps them to its file's own naming. Errors are the reader's, so a loader reports them with
/// its file and naming: [`LinearReader::bad`] for a tensor whose content is wrong, [`LinearReader::shape_err`]
/// for one of the wrong shape.
pub trait LinearReader {
    type Error: From<crate::Error> + From<candle_core::Error>;

    fn contains(&self, name: &str) -> bool;
    /// The stored dtype of `name` (`f32`, `i8`, …), if the source knows it.
    fn dtype_of(&self, name: &str) -> Option<String>;
    /// `name` as f32; with `shape` checked (`0` accepts any size).
    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor, Self::Error>;
    /// A dense weight `name` with `shape` checked: in the dtype the model keeps dense weights in (f16 and
    /// bf16 stay 16-bit unless the load asks otherwise); f32 by default.
    fn get_weight(&self, name: &str, shape: &[usize]) -> Result<Tensor, Self::Error> {
        self.get(name, shape)
    }
    /// `name` as f32, any shape.
    fn load_f32(&self, name: &str) -> Result<Tensor, Self::Error>;
    /// `name` in its stored dtype.
    fn load_native(&self, name: &str) -> Result<Tensor, Self::Error>;
    /// An int8 tensor's shape and data.
    fn load_i8(&self, name: &str) -> Result<(Vec<usize>, Vec<i8>), Self::Error>;
    /// A ggml block-quantized tensor's type id, shape and bytes, when blocks are to be kept (not dequantized).
    fn raw_block(&self, name: &str) -> Option<(u32, Vec<usize>, &[u8])>;
    /// An error about `name`'s content.
    fn bad(&self, name: &str, msg: String) -> Self::Error;
    /// An error about `name`'s shape.
    fn shape_err(&self, name: &str, expected: &[usize], got: &[usize]) -> Self::Error;
}

/// The expected (out, in) of a Linear's weight; `0` = any size.
pub(crate) type Expect = [usize; 2];

/// What a codec's `read` is asked for: the Linear `name` in `r`, its expected sizes (0 = any), and whether a
/// bias must be stored.
pub(crate) struct Request<'a, R: ?Sized> {
    pub r: &'a R,
    pub name: &'a str,
    pub expect: Expect,
    pub bias: bool,
}

/// Whether a stored 2-D `shape` matches `expect` (0 = any size).
pub(crate) fn fits(shape: &[usize], expect: &Expect) -> bool {
    shape.len() == 2 && shape.iter().zip(expect).all(|(a, b)| *b == 0 || a == b)
}

/// `name.bias` of `rows` elements when `bias` is asked for or present.
pub(crate) fn read_bias<R: LinearReader + ?Sized>(
    r: &R,
    name: &str,
    rows: usize,
    bias: bool,
) -> std::result::Result<Option<Tensor>, R::Error> {
    let bname = format!("{name}.bias");
    Ok(if bias || r.contains(&bname) { Some(r.get(&bname, &[rows])?) } else { None })
}
