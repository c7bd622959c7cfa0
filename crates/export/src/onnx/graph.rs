//! A small builder over [`super::proto`]: initializers, nodes with generated output names, graph inputs and
//! outputs with named (dynamic) axes, and the model around them.

use std::collections::{BTreeMap, HashMap};

use prost::Message;

use super::proto::*;

/// One axis of a graph input or output: a fixed size or a name (`batch_size`, `sequence_length`).
#[derive(Debug, Clone)]
pub enum Dim {
    Fixed(usize),
    Named(String),
}

impl From<usize> for Dim {
    fn from(n: usize) -> Self {
        Dim::Fixed(n)
    }
}

impl From<&str> for Dim {
    fn from(s: &str) -> Self {
        Dim::Named(s.into())
    }
}

/// An attribute of a node.
pub enum Attr {
    Int(i64),
    Float(f32),
    Ints(Vec<i64>),
    Str(String),
}

/// The graph under construction.
pub struct Graph {
    nodes: Vec<NodeProto>,
    inits: Vec<TensorProto>,
    init_bytes: usize,
    inputs: Vec<ValueInfoProto>,
    outputs: Vec<ValueInfoProto>,
    /// Domain → opset version (`""` is `ai.onnx`).
    opsets: BTreeMap<String, i64>,
    counter: usize,
    /// Initializers already written, by the identity of what they came from: a tensor shared by several
    /// blocks (`whittle share`) or by the embedding and the head is stored once.
    pub(crate) cache: HashMap<String, Vec<String>>,
    /// Constants by value, so each small constant is written once.
    consts: HashMap<(i32, Vec<i64>, Vec<u8>), String>,
    /// How Linears are written.
    pub options: super::linear::LinearOptions,
}

impl Graph {
    /// An empty graph importing `ai.onnx` at `opset`.
    pub fn new(opset: i64) -> Self {
        let mut opsets = BTreeMap::new();
        opsets.insert(String::new(), opset);
        Self {
            nodes: Vec::new(),
            inits: Vec::new(),
            init_bytes: 0,
            inputs: Vec::new(),
            outputs: Vec::new(),
            opsets,
            counter: 0,
            cache: HashMap::new(),
            consts: HashMap::new(),
            options: Default::default(),
        }
    }

    /// Imports `domain` at `version` too (e.g. `com.microsoft` 1 for ONNX Runtime's contrib operators).
    pub fn import(&mut self, domain: &str, version: i64) {
        self.opsets.insert(domain.into(), version);
    }

    /// Bytes of initializer data so far.
    pub fn initializer_bytes(&self) -> usize {
        self.init_bytes
    }

    /// Adds an initializer of raw little-endian `data`; returns its name.
    pub fn init_raw(&mut self, name: &str, ty: DataType, dims: &[usize], data: Vec<u8>) -> String {
        self.init_bytes += data.len();
        self.inits.push(TensorProto {
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: ty as i32,
            name: name.into(),
            raw_data: data,
        });
        name.into()
    }

    pub fn init_f32(&mut self, name: &str, dims: &[usize], v: &[f32]) -> String {
        debug_assert_eq!(dims.iter().product::<usize>(), v.len());
        self.init_raw(name, DataType::Float, dims, v.iter().flat_map(|x| x.to_le_bytes()).collect())
    }

    pub fn init_i8(&mut self, name: &str, dims: &[usize], v: &[i8]) -> String {
        self.init_raw(name, DataType::Int8, dims, v.iter().map(|&x| x as u8).collect())
    }

    pub fn init_u8(&mut self, name: &str, dims: &[usize], v: &[u8]) -> String {
        self.init_raw(name, DataType::Uint8, dims, v.to_vec())
    }

    fn constant(&mut self, ty: DataType, dims: &[usize], raw: Vec<u8>) -> String {
        let key = (ty as i32, dims.iter().map(|&d| d as i64).collect::<Vec<_>>(), raw);
        if let Some(n) = self.consts.get(&key) {
            return n.clone();
        }
        let name = format!("const_{}", self.consts.len());
        self.init_raw(&name, ty, dims, key.2.clone());
        self.consts.insert(key, name.clone());
        name
    }

    /// A 1-D int64 constant (shapes, axes, indices).
    pub fn ints(&mut self, v: &[i64]) -> String {
        self.constant(DataType::Int64, &[v.len()], v.iter().flat_map(|x| x.to_le_bytes()).collect())
    }

    /// A scalar int64 constant.
    pub fn int(&mut self, v: i64) -> String {
        self.constant(DataType::Int64, &[], v.to_le_bytes().to_vec())
    }

    /// A scalar f32 constant.
    pub fn float(&mut self, v: f32) -> String {
        self.constant(DataType::Float, &[], v.to_le_bytes().to_vec())
    }

    /// A 1-D f32 constant.
    pub fn floats(&mut self, v: &[f32]) -> String {
        self.constant(DataType::Float, &[v.len()], v.iter().flat_map(|x| x.to_le_bytes()).collect())
    }

    /// A node of `op` (domain `ai.onnx`) with one output; returns the output's name.
    pub fn op(&mut self, op: &str, inputs: &[&str], attrs: Vec<(&str, Attr)>) -> String {
        self.op_n(op, "", inputs, 1, attrs).remove(0)
    }

    /// A node of `op` in `domain` with `n_out` outputs; returns their names.
    pub fn op_n(
        &mut self,
        op: &str,
        domain: &str,
        inputs: &[&str],
        n_out: usize,
        attrs: Vec<(&str, Attr)>,
    ) -> Vec<String> {
        self.counter += 1;
        let id = self.counter;
        let outputs: Vec<String> = (0..n_out).map(|i| format!("{op}_{id}_out{i}")).collect();
        self.push_node(op, domain, inputs, &outputs, attrs, id);
        outputs
    }

    /// A node writing to the given output names (graph outputs such as `logits`).
    pub fn op_into(&mut self, op: &str, inputs: &[&str], outputs: &[&str], attrs: Vec<(&str, Attr)>) {
        self.counter += 1;
        let id = self.counter;
        let outs: Vec<String> = outputs.iter().map(|s| s.to_string()).collect();
        self.push_node(op, "", inputs, &outs, attrs, id);
    }

    fn push_node(
        &mut self,
        op: &str,
        domain: &str,
        inputs: &[&str],
        outputs: &[String],
        attrs: Vec<(&str, Attr)>,
        id: usize,
    ) {
        let attribute = attrs
            .into_iter()
            .map(|(name, a)| {
                let mut p = AttributeProto { name: name.into(), ..Default::default() };
                match a {
                    Attr::Int(i) => (p.i, p.r#type) = (i, AttributeType::Int as i32),
                    Attr::Float(f) => (p.f, p.r#type) = (f, AttributeType::Float as i32),
                    Attr::Ints(v) => (p.ints, p.r#type) = (v, AttributeType::Ints as i32),
                    Attr::Str(s) => (p.s, p.r#type) = (s.into_bytes(), AttributeType::String as i32),
                }
                p
            })
            .collect();
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.to_vec(),
            name: format!("{op}_{id}"),
            op_type: op.into(),
            attribute,
            domain: domain.into(),
        });
    }

    fn value_info(name: &str, ty: DataType, dims: &[Dim]) -> ValueInfoProto {
        let dim = dims
            .iter()
            .map(|d| Dimension {
                value: Some(match d {
                    Dim::Fixed(n) => DimValue::DimValue(*n as i64),
                    Dim::Named(s) => DimValue::DimParam(s.clone()),
                }),
            })
            .collect();
        ValueInfoProto {
            name: name.into(),
            r#type: Some(TypeProto {
                tensor_type: Some(TypeProtoTensor { elem_type: ty as i32, shape: Some(TensorShapeProto { dim }) }),
            }),
        }
    }

    /// Declares a graph input.
    pub fn input(&mut self, name: &str, ty: DataType, dims: &[Dim]) -> String {
        self.inputs.push(Self::value_info(name, ty, dims));
        name.into()
    }

    /// Declares a graph output (some node must write `name`).
    pub fn output(&mut self, name: &str, ty: DataType, dims: &[Dim]) {
        self.outputs.push(Self::value_info(name, ty, dims));
    }

    /// Makes `value` the graph output `name` (an Identity node when it has another name).
    pub fn output_from(&mut self, value: &str, name: &str, ty: DataType, dims: &[Dim]) {
        if value != name {
            self.op_into("Identity", &[value], &[name], vec![]);
        }
        self.output(name, ty, dims);
    }

    /// The serialised model.
    pub fn finish(self, name: &str, doc: &str, metadata: &[(&str, String)]) -> Vec<u8> {
        let m = ModelProto {
            ir_version: IR_VERSION,
            producer_name: "whittle".into(),
            producer_version: env!("CARGO_PKG_VERSION").into(),
            doc_string: doc.into(),
            graph: Some(GraphProto {
                node: self.nodes,
                name: name.into(),
                initializer: self.inits,
                doc_string: String::new(),
                input: self.inputs,
                output: self.outputs,
            }),
            opset_import: self
                .opsets
                .into_iter()
                .map(|(domain, version)| OperatorSetIdProto { domain, version })
                .collect(),
            metadata_props: metadata
                .iter()
                .map(|(k, v)| StringStringEntryProto { key: k.to_string(), value: v.clone() })
                .collect(),
        };
        m.encode_to_vec()
    }
}

/// A candle tensor as an f32 initializer, stored once however many nodes use it (shared blocks, a tied head).
pub(crate) fn f32_init(g: &mut Graph, name: &str, t: &candle_core::Tensor) -> crate::Result<String> {
    let key = format!("tensor:{:?}", t.id());
    if let Some(n) = g.cache.get(&key) {
        return Ok(n[0].clone());
    }
    let dims = t.dims().to_vec();
    let v: Vec<f32> = t.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1()?;
    let n = g.init_f32(name, &dims, &v);
    g.cache.insert(key, vec![n.clone()]);
    Ok(n)
}
