//! Wire-friendly tensors: plain enums and `Vec`s, so serde formats without
//! self-description (postcard) carry them as they are.

use serde::{Deserialize, Serialize};
use tract_onnx::prelude::*;

use super::InferenceError;

/// Element type of a tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    /// 32-bit float.
    F32,
    /// 16-bit IEEE float (carried as raw bits).
    F16,
    /// 64-bit signed integer.
    I64,
    /// 32-bit signed integer.
    I32,
    /// 8-bit signed integer.
    I8,
    /// 8-bit unsigned integer.
    U8,
    /// Boolean.
    Bool,
}

impl DType {
    /// The tract datum type.
    pub fn datum_type(self) -> DatumType {
        match self {
            DType::F32 => DatumType::F32,
            DType::F16 => DatumType::F16,
            DType::I64 => DatumType::I64,
            DType::I32 => DatumType::I32,
            DType::I8 => DatumType::I8,
            DType::U8 => DatumType::U8,
            DType::Bool => DatumType::Bool,
        }
    }

    /// Size of one element in bytes.
    pub fn size_of(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::F16 => 2,
            DType::I64 => 8,
            DType::I8 | DType::U8 | DType::Bool => 1,
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::I64 => "i64",
            DType::I32 => "i32",
            DType::I8 => "i8",
            DType::U8 => "u8",
            DType::Bool => "bool",
        };
        f.write_str(s)
    }
}

/// Tensor elements in row-major order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum TensorData {
    /// f32 values.
    F32(Vec<f32>),
    /// f16 values as their IEEE bit patterns.
    F16(Vec<u16>),
    /// i64 values.
    I64(Vec<i64>),
    /// i32 values.
    I32(Vec<i32>),
    /// i8 values.
    I8(Vec<i8>),
    /// u8 values.
    U8(Vec<u8>),
    /// bool values.
    Bool(Vec<bool>),
}

impl TensorData {
    /// The element type of these values.
    pub fn dtype(&self) -> DType {
        match self {
            TensorData::F32(_) => DType::F32,
            TensorData::F16(_) => DType::F16,
            TensorData::I64(_) => DType::I64,
            TensorData::I32(_) => DType::I32,
            TensorData::I8(_) => DType::I8,
            TensorData::U8(_) => DType::U8,
            TensorData::Bool(_) => DType::Bool,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            TensorData::F32(v) => v.len(),
            TensorData::F16(v) => v.len(),
            TensorData::I64(v) => v.len(),
            TensorData::I32(v) => v.len(),
            TensorData::I8(v) => v.len(),
            TensorData::U8(v) => v.len(),
            TensorData::Bool(v) => v.len(),
        }
    }

    /// True when there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A named tensor: what goes into and comes out of [`super::Engine::run`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NamedTensor {
    /// Input or output name in the model.
    pub name: String,
    /// Element type; always equal to `data.dtype()` in a valid tensor.
    pub dtype: DType,
    /// Dimensions, row-major.
    pub shape: Vec<usize>,
    /// Elements.
    pub data: TensorData,
}

impl NamedTensor {
    /// Builds a tensor, taking the dtype from the data.
    pub fn new(name: impl Into<String>, shape: Vec<usize>, data: TensorData) -> Self {
        NamedTensor {
            name: name.into(),
            dtype: data.dtype(),
            shape,
            data,
        }
    }

    /// An f32 tensor.
    pub fn f32(name: impl Into<String>, shape: Vec<usize>, data: Vec<f32>) -> Self {
        Self::new(name, shape, TensorData::F32(data))
    }

    /// The values as f32 when this is an f32 tensor.
    pub fn as_f32(&self) -> Option<&[f32]> {
        match &self.data {
            TensorData::F32(v) => Some(v),
            _ => None,
        }
    }

    /// Values converted to f32 (f16, integers and bools widen); handy for comparisons.
    pub fn to_f32_vec(&self) -> Vec<f32> {
        match &self.data {
            TensorData::F32(v) => v.clone(),
            TensorData::F16(v) => v.iter().map(|b| f16::from_bits(*b).to_f32()).collect(),
            TensorData::I64(v) => v.iter().map(|x| *x as f32).collect(),
            TensorData::I32(v) => v.iter().map(|x| *x as f32).collect(),
            TensorData::I8(v) => v.iter().map(|x| *x as f32).collect(),
            TensorData::U8(v) => v.iter().map(|x| *x as f32).collect(),
            TensorData::Bool(v) => v.iter().map(|x| *x as u8 as f32).collect(),
        }
    }

    /// Checks that dtype, shape and data agree.
    pub fn validate(&self) -> Result<(), InferenceError> {
        if self.dtype != self.data.dtype() {
            return Err(InferenceError::BadTensor {
                tensor: self.name.clone(),
                message: format!(
                    "dtype says {} but data is {}",
                    self.dtype,
                    self.data.dtype()
                ),
            });
        }
        let want: usize = self.shape.iter().product();
        if want != self.data.len() {
            return Err(InferenceError::BadTensor {
                tensor: self.name.clone(),
                message: format!(
                    "{} values do not fill shape {:?} ({} expected)",
                    self.data.len(),
                    self.shape,
                    want
                ),
            });
        }
        Ok(())
    }

    /// Converts to a tract tensor (validating first).
    pub fn to_tract(&self) -> Result<Tensor, InferenceError> {
        self.validate()?;
        let s = &self.shape;
        let t = match &self.data {
            TensorData::F32(v) => Tensor::from_shape(s, v),
            TensorData::F16(v) => {
                let h: Vec<f16> = v.iter().map(|b| f16::from_bits(*b)).collect();
                Tensor::from_shape(s, &h)
            }
            TensorData::I64(v) => Tensor::from_shape(s, v),
            TensorData::I32(v) => Tensor::from_shape(s, v),
            TensorData::I8(v) => Tensor::from_shape(s, v),
            TensorData::U8(v) => Tensor::from_shape(s, v),
            TensorData::Bool(v) => Tensor::from_shape(s, v),
        };
        t.map_err(|e| InferenceError::BadTensor {
            tensor: self.name.clone(),
            message: format!("{e:#}"),
        })
    }

    /// Converts a tract tensor, naming it.
    pub fn from_tract(name: impl Into<String>, t: &Tensor) -> Result<Self, InferenceError> {
        let name = name.into();
        let bad = |e: TractError| InferenceError::BadTensor {
            tensor: name.clone(),
            message: format!("{e:#}"),
        };
        fn collect<T: Datum + Copy>(t: &Tensor) -> TractResult<Vec<T>> {
            Ok(t.to_plain_array_view::<T>()?.iter().copied().collect())
        }
        let data = match t.datum_type() {
            DatumType::F32 => TensorData::F32(collect(t).map_err(bad)?),
            DatumType::F16 => TensorData::F16(
                collect::<f16>(t)
                    .map_err(bad)?
                    .into_iter()
                    .map(|h| h.to_bits())
                    .collect(),
            ),
            DatumType::I64 => TensorData::I64(collect(t).map_err(bad)?),
            DatumType::I32 => TensorData::I32(collect(t).map_err(bad)?),
            DatumType::I8 => TensorData::I8(collect(t).map_err(bad)?),
            DatumType::U8 => TensorData::U8(collect(t).map_err(bad)?),
            DatumType::Bool => TensorData::Bool(collect(t).map_err(bad)?),
            other => {
                return Err(InferenceError::BadTensor {
                    tensor: name,
                    message: format!("element type {other:?} is not carried by NamedTensor"),
                })
            }
        };
        Ok(NamedTensor::new(name, t.shape().to_vec(), data))
    }
}
