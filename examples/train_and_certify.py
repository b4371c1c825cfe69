"""Build, train, certify and export a 1-Lipschitz classifier with liptune's core alone.

.venv/bin/python examples/train_and_certify.py
"""

import torch
from sklearn.datasets import load_digits

from liptune import nn as lnn
from liptune.certify import certified_robust_accuracy, predict_with_certificates
from liptune.export import lipschitz_upper_bound, vanilla_export
from liptune.losses import MulticlassHKRLoss

torch.manual_seed(0)
digits = load_digits()
x = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)  # (N, 1, 8, 8) in [0, 1]
y = torch.tensor(digits.target)
x_train, y_train, x_test, y_test = x[:1500], y[:1500], x[1500:], y[1500:]

model = lnn.LipschitzSequential(
    torch.nn.Flatten(),
    lnn.SpectralLinear(64, 128),
    lnn.GroupSort2(),
    lnn.SpectralLinear(128, 128),
    lnn.GroupSort2(),
    lnn.SpectralLinear(128, 10),  # the whole logit map is 1-Lipschitz: "global" certificates
)
loss_fn = MulticlassHKRLoss(alpha_kr=50.0, margin=0.5)
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

model.train()
for _epoch in range(20):
    for batch in torch.randperm(len(x_train)).split(128):
        optimizer.zero_grad()
        loss_fn(model(x_train[batch]), y_train[batch]).backward()
        optimizer.step()

logits, predictions, radii = predict_with_certificates(model, x_test)
eps = [0.1, 0.25, 0.5, 1.0]
certified = certified_robust_accuracy(logits, y_test, eps, model.certificate_mode)
print(f"certificate mode: {model.certificate_mode}")
print(f"clean accuracy: {(predictions == y_test).float().mean():.3f}")
for e, accuracy in zip(eps, certified.tolist(), strict=True):
    print(f"certified accuracy at eps={e}: {accuracy:.3f}")

plain = vanilla_export(model)  # nn.Linear + GroupSort2, same outputs, picklable
print(f"Lipschitz upper bound of the exported model: {lipschitz_upper_bound(plain, (1, 8, 8)):.4f}")
