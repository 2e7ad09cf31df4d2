# Copied from pytorch/examples, time_sequence_prediction (train.py and generate_sine_wave.py):
# https://github.com/pytorch/examples/blob/main/time_sequence_prediction/train.py
# https://github.com/pytorch/examples/blob/main/time_sequence_prediction/generate_sine_wave.py
# License: BSD-3-Clause (pytorch/examples), Copyright (c) 2017, the PyTorch team.
#
# Kept verbatim: the Sequence model (two LSTMCells in float64), the seeding, the train/test split
# of `data`, LBFGS(lr=0.8) on the whole data set with a closure, and the training loop with its
# no_grad prediction of `future` values.
# Changed: argparse -> a class `opt` with --steps 15 -> 1 and --device cuda; the sine waves are
# generated in memory as generate_sine_wave.py does (L = 1000 -> 100) instead of torch.load
# ('traindata.pt'); matplotlib is not installed here, so the plot saved per step is
# np.save('predict%d.npy' % i, y). The cells are separated by "# %% name" lines;
# tests/test_third_party_fresh.py runs them.

# %% data
import numpy as np
import torch
import torch.nn as nn
import torch.optim as optim
# generate_sine_wave.py: T = 20, L = 1000, N = 100 -> L = 100
np.random.seed(2)
T = 20
L = 100
N = 100
x = np.empty((N, L), 'int64')
x[:] = np.array(range(L)) + np.random.randint(-4 * T, 4 * T, N).reshape(N, 1)
traindata = np.sin(x / 1.0 / T).astype('float64')

# %% setup
class Sequence(nn.Module):
    def __init__(self):
        super(Sequence, self).__init__()
        self.lstm1 = nn.LSTMCell(1, 51)
        self.lstm2 = nn.LSTMCell(51, 51)
        self.linear = nn.Linear(51, 1)
        self.dummy_param = nn.Parameter(torch.empty(0))

    def forward(self, input, future = 0):
        outputs = []
        device = self.dummy_param.device
        h_t = torch.zeros(input.size(0), 51, dtype=torch.double).to(device)
        c_t = torch.zeros(input.size(0), 51, dtype=torch.double).to(device)
        h_t2 = torch.zeros(input.size(0), 51, dtype=torch.double).to(device)
        c_t2 = torch.zeros(input.size(0), 51, dtype=torch.double).to(device)

        for input_t in input.split(1, dim=1):
            h_t, c_t = self.lstm1(input_t, (h_t, c_t))
            h_t2, c_t2 = self.lstm2(h_t, (h_t2, c_t2))
            output = self.linear(h_t2)
            outputs += [output]
        for i in range(future):# if we should predict the future
            h_t, c_t = self.lstm1(output, (h_t, c_t))
            h_t2, c_t2 = self.lstm2(h_t, (h_t2, c_t2))
            output = self.linear(h_t2)
            outputs += [output]
        outputs = torch.cat(outputs, dim=1)
        return outputs

class opt:  # argparse defaults: --steps 15 -> 1, --device cuda
    steps = 1
    device = 'cuda'
device_name = opt.device
device = torch.device(device_name)
# set random seed to 0
np.random.seed(0)
torch.manual_seed(0)
# load data and make training set
data = torch.from_numpy(traindata).to(device)
input = data[3:, :-1]
target = data[3:, 1:]
test_input = data[:3, :-1]
test_target = data[:3, 1:]
# build the model
seq = Sequence().to(device).double()
criterion = nn.MSELoss().to(device)
# use LBFGS as optimizer since we can load the whole data to train
optimizer = optim.LBFGS(seq.parameters(), lr=0.8)

# %% train
#begin to train
for i in range(opt.steps):
    print('STEP: ', i)
    def closure():
        optimizer.zero_grad()
        out = seq(input)
        loss = criterion(out, target)
        print('loss:', loss.item())
        loss.backward()
        return loss
    optimizer.step(closure)
    # begin to predict, no need to track gradient here
    with torch.no_grad():
        future = 1000
        pred = seq(test_input, future=future)
        loss = criterion(pred[:, :-future], test_target)
        print('test loss:', loss.item())
        y = pred.cpu().detach().numpy()
    np.save('predict%d.npy'%i, y)  # plt.savefig('predict%d.pdf'%i): matplotlib is not installed
