"""The built-in functions of the expression language as Python callables that build ``Expr``s.

``sin(x)`` renders ``sin(x)``; keyword arguments pass through (``sum(x, axis=0)``). The names match
``GET /v1/functions`` (a test keeps them in step with the server's table); arguments are checked by
the server, which answers a wrong call with a located error.
"""

from __future__ import annotations

from service.client._builder import Expr, Operand, call

__all__ = [
    "abs",
    "arange",
    "arccos",
    "arccosh",
    "arcsin",
    "arcsinh",
    "arctan",
    "arctan2",
    "arctanh",
    "broadcast_to",
    "cast",
    "ceil",
    "cholesky",
    "clip",
    "clip_gradient",
    "concatenate",
    "cos",
    "cosh",
    "cross",
    "cumprod",
    "cumsum",
    "det",
    "diag",
    "digamma",
    "dot",
    "einsum",
    "elu",
    "erf",
    "exp",
    "expand_dims",
    "expm1",
    "eye",
    "floor",
    "gather",
    "gelu",
    "inv",
    "lgamma",
    "linspace",
    "log",
    "log10",
    "log1p",
    "log2",
    "log_softmax",
    "logsumexp",
    "matmul",
    "max",
    "maximum",
    "mean",
    "min",
    "minimum",
    "multigammaln",
    "norm",
    "one_hot",
    "ones",
    "ones_like",
    "prod",
    "relu",
    "reshape",
    "round",
    "scatter_add",
    "segment_sum",
    "selu",
    "sigmoid",
    "sign",
    "sin",
    "sinh",
    "slogdet",
    "softmax",
    "softplus",
    "solve",
    "sqrt",
    "square",
    "squeeze",
    "stack",
    "std",
    "stop_gradient",
    "sum",
    "swish",
    "take",
    "tan",
    "tanh",
    "tile",
    "trace",
    "transpose",
    "tril",
    "triu",
    "var",
    "where",
    "zeros",
    "zeros_like",
]


class BuiltinFunction:
    """One built-in of the language; calling it builds the call's expression."""

    def __init__(self, name: str, signature: str, doc: str) -> None:
        self.__name__ = name
        self.signature = signature
        self.__doc__ = f"{signature}: {doc}"

    def __call__(self, *args: Operand, **keywords: Operand) -> Expr:
        return call(self.__name__, *args, **keywords)

    def __repr__(self) -> str:
        return f"<tapeserve function {self.signature}>"


# elementwise
abs = BuiltinFunction("abs", "abs(x)", "Absolute value |x|.")
arccos = BuiltinFunction("arccos", "arccos(x)", "Inverse cosine.")
arccosh = BuiltinFunction("arccosh", "arccosh(x)", "Inverse hyperbolic cosine.")
arcsin = BuiltinFunction("arcsin", "arcsin(x)", "Inverse sine.")
arcsinh = BuiltinFunction("arcsinh", "arcsinh(x)", "Inverse hyperbolic sine.")
arctan = BuiltinFunction("arctan", "arctan(x)", "Inverse tangent.")
arctan2 = BuiltinFunction("arctan2", "arctan2(y, x)", "Angle of the point (x, y), elementwise.")
arctanh = BuiltinFunction("arctanh", "arctanh(x)", "Inverse hyperbolic tangent.")
cast = BuiltinFunction("cast", "cast(x, dtype)", 'x converted to "float32", "float64", "int32" or "bool".')
ceil = BuiltinFunction("ceil", "ceil(x)", "Round up (zero derivative).")
clip = BuiltinFunction("clip", "clip(x, lo, hi)", "x limited to [lo, hi], elementwise.")
cos = BuiltinFunction("cos", "cos(x)", "Cosine (radians).")
cosh = BuiltinFunction("cosh", "cosh(x)", "Hyperbolic cosine.")
digamma = BuiltinFunction("digamma", "digamma(x)", "Digamma psi(x), the derivative of lgamma.")
elu = BuiltinFunction("elu", "elu(x)", "Exponential linear unit (alpha 1).")
erf = BuiltinFunction("erf", "erf(x)", "Error function.")
exp = BuiltinFunction("exp", "exp(x)", "Exponential e**x.")
expm1 = BuiltinFunction("expm1", "expm1(x)", "exp(x) - 1, accurate near 0.")
floor = BuiltinFunction("floor", "floor(x)", "Round down (zero derivative).")
gelu = BuiltinFunction("gelu", "gelu(x)", "Gaussian error linear unit (exact, erf form).")
lgamma = BuiltinFunction("lgamma", "lgamma(x)", "log |Gamma(x)|.")
log = BuiltinFunction("log", "log(x)", "Natural logarithm.")
log10 = BuiltinFunction("log10", "log10(x)", "Base-10 logarithm.")
log1p = BuiltinFunction("log1p", "log1p(x)", "log(1 + x), accurate near 0.")
log2 = BuiltinFunction("log2", "log2(x)", "Base-2 logarithm.")
maximum = BuiltinFunction("maximum", "maximum(a, b)", "Elementwise maximum (broadcasting).")
minimum = BuiltinFunction("minimum", "minimum(a, b)", "Elementwise minimum (broadcasting).")
multigammaln = BuiltinFunction(
    "multigammaln",
    "multigammaln(a, p)",
    "log of the multivariate gamma function Gamma_p(a), elementwise (scipy's multigammaln).",
)
ones_like = BuiltinFunction("ones_like", "ones_like(x)", "Ones with x's shape.")
relu = BuiltinFunction("relu", "relu(x)", "max(x, 0).")
round = BuiltinFunction("round", "round(x)", "Round half to even, like numpy (zero derivative).")
selu = BuiltinFunction("selu", "selu(x)", "Scaled exponential linear unit.")
sigmoid = BuiltinFunction("sigmoid", "sigmoid(x)", "Logistic sigmoid 1 / (1 + exp(-x)).")
sign = BuiltinFunction("sign", "sign(x)", "Sign of x: -1, 0 or 1 (zero derivative).")
sin = BuiltinFunction("sin", "sin(x)", "Sine (radians).")
sinh = BuiltinFunction("sinh", "sinh(x)", "Hyperbolic sine.")
softplus = BuiltinFunction("softplus", "softplus(x)", "log(1 + exp(x)).")
sqrt = BuiltinFunction("sqrt", "sqrt(x)", "Square root.")
square = BuiltinFunction("square", "square(x)", "x squared.")
swish = BuiltinFunction("swish", "swish(x)", "x * sigmoid(x) (SiLU).")
tan = BuiltinFunction("tan", "tan(x)", "Tangent (radians).")
tanh = BuiltinFunction("tanh", "tanh(x)", "Hyperbolic tangent.")
where = BuiltinFunction("where", "where(condition, a, b)", "a where condition holds, else b (broadcasting).")
zeros_like = BuiltinFunction("zeros_like", "zeros_like(x)", "Zeros with x's shape.")
# gradient
clip_gradient = BuiltinFunction(
    "clip_gradient",
    "clip_gradient(x, lo, hi)",
    "x forward; every gradient flowing back through it (any order) is clipped to [lo, hi].",
)
stop_gradient = BuiltinFunction(
    "stop_gradient", "stop_gradient(x)", "x, but no gradient flows back through it."
)
# linalg
cholesky = BuiltinFunction(
    "cholesky", "cholesky(x)", "Lower Cholesky factor of a symmetric positive-definite matrix."
)
cross = BuiltinFunction(
    "cross", "cross(a, b)", "Cross product over the last axis (length 3), broadcasting like numpy."
)
det = BuiltinFunction("det", "det(x)", "Determinant of a square matrix (batched over leading axes).")
diag = BuiltinFunction("diag", "diag(x, k=0)", "Vector -> diagonal matrix; matrix -> its k-th diagonal.")
dot = BuiltinFunction(
    "dot", "dot(a, b)", "numpy dot: inner product of vectors, matrix product, or sum over a's last axis."
)
einsum = BuiltinFunction(
    "einsum", "einsum(subscripts, *operands)", 'Einstein summation, e.g. einsum("ij,jk->ik", a, b).'
)
eye = BuiltinFunction("eye", "eye(n, m=None)", "n x m identity matrix (m defaults to n).")
inv = BuiltinFunction("inv", "inv(x)", "Matrix inverse.")
matmul = BuiltinFunction(
    "matmul", "matmul(a, b)", "Matrix product with numpy's rules for 1-D operands and batch broadcasting."
)
slogdet = BuiltinFunction("slogdet", "slogdet(x)", "log |det x| (the second result of numpy's slogdet).")
solve = BuiltinFunction("solve", "solve(a, b)", "x with a @ x = b (b a vector or a matrix).")
trace = BuiltinFunction("trace", "trace(x)", "Sum of the diagonal over the first two axes, like numpy.")
transpose = BuiltinFunction("transpose", "transpose(x, axes=None)", "Permute axes (reverse them by default).")
# other
log_softmax = BuiltinFunction(
    "log_softmax", "log_softmax(x, axis=-1)", "log(softmax(x)) along axis, computed stably."
)
softmax = BuiltinFunction("softmax", "softmax(x, axis=-1)", "exp(x) / sum(exp(x)) along axis.")
# reduction
cumprod = BuiltinFunction(
    "cumprod", "cumprod(x, axis=None)", "Running product along axis (flattened by default)."
)
cumsum = BuiltinFunction("cumsum", "cumsum(x, axis=None)", "Running sum along axis (flattened by default).")
logsumexp = BuiltinFunction(
    "logsumexp", "logsumexp(x, axis=None, keepdims=False)", "log(sum(exp(x))) over axis, computed stably."
)
max = BuiltinFunction("max", "max(x, axis=None, keepdims=False)", "Maximum over axis (all axes by default).")
mean = BuiltinFunction("mean", "mean(x, axis=None, keepdims=False)", "Mean over axis (all axes by default).")
min = BuiltinFunction("min", "min(x, axis=None, keepdims=False)", "Minimum over axis (all axes by default).")
norm = BuiltinFunction(
    "norm",
    "norm(x, ord=None, axis=None, keepdims=False)",
    'Entrywise norm over axis: ord None/2/"fro" Euclidean, 1 sum |x|, inf max |x|.',
)
prod = BuiltinFunction(
    "prod", "prod(x, axis=None, keepdims=False)", "Product over axis (all axes by default)."
)
std = BuiltinFunction(
    "std", "std(x, axis=None, keepdims=False)", "Population standard deviation (ddof=0) over axis."
)
sum = BuiltinFunction("sum", "sum(x, axis=None, keepdims=False)", "Sum over axis (all axes by default).")
var = BuiltinFunction(
    "var", "var(x, axis=None, keepdims=False)", "Population variance (ddof=0, like numpy) over axis."
)
# shape
arange = BuiltinFunction(
    "arange", "arange(start, stop=None, step=1)", "Evenly spaced values in [start, stop), like numpy."
)
broadcast_to = BuiltinFunction("broadcast_to", "broadcast_to(x, shape)", "x broadcast to a shape.")
concatenate = BuiltinFunction("concatenate", "concatenate(arrays, axis=0)", "Join [a, b, ...] along an axis.")
expand_dims = BuiltinFunction("expand_dims", "expand_dims(x, axis)", "Insert an axis of length 1.")
gather = BuiltinFunction("gather", "gather(x, indices, axis=0)", "Slices of x at integer indices along axis.")
linspace = BuiltinFunction(
    "linspace", "linspace(start, stop, num=50)", "num evenly spaced values from start to stop inclusive."
)
one_hot = BuiltinFunction(
    "one_hot", "one_hot(indices, depth)", "One-hot rows of length depth for integer indices."
)
ones = BuiltinFunction("ones", "ones(shape)", "A tensor of ones.")
reshape = BuiltinFunction("reshape", "reshape(x, shape)", "Same elements in a new shape (one -1 allowed).")
scatter_add = BuiltinFunction(
    "scatter_add",
    "scatter_add(x, indices, updates)",
    "x with updates[i] added to x[indices[i]] along axis 0 (repeated indices accumulate).",
)
segment_sum = BuiltinFunction(
    "segment_sum",
    "segment_sum(data, segment_ids, num_segments)",
    "Sums of data's rows by integer segment id (ids in [0, num_segments); out-of-range ids are an error).",
)
squeeze = BuiltinFunction("squeeze", "squeeze(x, axis=None)", "Remove axes of length 1.")
stack = BuiltinFunction("stack", "stack(arrays, axis=0)", "Stack [a, b, ...] along a new axis.")
take = BuiltinFunction(
    "take", "take(x, indices, axis=None)", "Elements at integer indices (flattened x by default)."
)
tile = BuiltinFunction("tile", "tile(x, reps)", "Repeat x reps times along each axis.")
tril = BuiltinFunction("tril", "tril(x, k=0)", "Lower triangle (elements above the k-th diagonal zeroed).")
triu = BuiltinFunction("triu", "triu(x, k=0)", "Upper triangle (elements below the k-th diagonal zeroed).")
zeros = BuiltinFunction("zeros", "zeros(shape)", "A tensor of zeros.")
