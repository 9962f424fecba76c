// A gradserve client in Node.js built from protos/ alone (@grpc/grpc-js + @grpc/proto-loader).
// Lists the models, computes the gradient of dense2 (output = 0.5·Σx + 0.1, so 0.5 everywhere),
// runs a ComputeStream with one bad request among good ones (its error arrives in-band), checks
// that an unknown model is NOT_FOUND, and resolves a method through reflection v1.
//
//   npm ci && node client.js 127.0.0.1:50051      (exits 1 if any check fails)
'use strict';

const assert = require('node:assert/strict');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTOS = path.resolve(__dirname, '..', '..', 'protos');
const OPTIONS = { keepCase: true, longs: String, enums: String, defaults: true, oneofs: true };
const v1 = grpc.loadPackageDefinition(protoLoader.loadSync(
  ['gradserve/v1/sensitivity_service.proto', 'gradserve/v1/model_service.proto'],
  { ...OPTIONS, includeDirs: [PROTOS] })).gradserve.v1;

// Tensors: exact dtype, little-endian C-order bytes, int64 shape (strings here: longs: String).
function float32Tensor(rows) {
  const data = Buffer.alloc(rows.length * rows[0].length * 4);
  rows.flat().forEach((v, i) => data.writeFloatLE(v, 4 * i));
  return { dtype: 'DATA_TYPE_FLOAT32', shape: [rows.length, rows[0].length], data };
}

function readFloat32(tensor) {
  assert.equal(tensor.dtype, 'DATA_TYPE_FLOAT32');
  const n = tensor.shape.reduce((a, d) => a * Number(d), 1);
  assert.equal(tensor.data.length, 4 * n);
  return Array.from({ length: n }, (_, i) => tensor.data.readFloatLE(4 * i));
}

function assertClose(actual, expected, tol, what) {
  actual.forEach((a, i) => assert.ok(Math.abs(a - expected[i]) <= tol, `${what}[${i}] = ${a}, expected ${expected[i]}`));
}

const call = (client, method, request) => new Promise((resolve, reject) =>
  client[method](request, { deadline: Date.now() + 30000 }, (err, res) => (err ? reject(err) : resolve(res))));

function stream(client, requests) {
  return new Promise((resolve, reject) => {
    const answers = [];
    const s = client.ComputeStream({ deadline: Date.now() + 30000 });
    s.on('data', (r) => answers.push(r));
    s.on('error', reject);
    s.on('end', () => resolve(answers));
    requests.forEach((request) => s.write({ request }));
    s.end();
  });
}

function reflectV1(target, symbol) {
  const dir = path.join(path.dirname(require.resolve('@grpc/reflection/package.json')), 'build', 'proto');
  const reflection = grpc.loadPackageDefinition(protoLoader.loadSync('grpc/reflection/v1/reflection.proto',
    { ...OPTIONS, includeDirs: [dir] })).grpc.reflection.v1;
  const client = new reflection.ServerReflection(target, grpc.credentials.createInsecure());
  return new Promise((resolve, reject) => {
    const s = client.ServerReflectionInfo();
    s.on('data', (r) => { resolve(r); s.end(); client.close(); });
    s.on('error', reject);
    s.write({ file_containing_symbol: symbol });
  });
}

async function main(target) {
  const models = new v1.ModelService(target, grpc.credentials.createInsecure());
  const sensitivity = new v1.SensitivityService(target, grpc.credentials.createInsecure());

  const listed = await call(models, 'ListModels', {});
  const names = listed.models.map((m) => m.name);
  assert.ok(names.includes('dense2'), `dense2 not in ${names}`);
  const dense2 = (await call(models, 'GetModel', { name: 'dense2' })).model.versions.at(-1);
  assert.deepEqual(dense2.inputs.map((i) => [i.name, i.dtype, i.shape]), [['input', 'DATA_TYPE_FLOAT32', ['-1', '4']]]);

  const x = [[1, 2, 3, 4], [-0.5, 0.25, 8, -3]];
  const r = await call(sensitivity, 'Compute', {
    model: 'dense2', method: 'METHOD_GRADIENT', inputs: { input: float32Tensor(x) }, include_outputs: true });
  assert.deepEqual(r.attributions.input.shape, ['2', '4']);
  assertClose(readFloat32(r.attributions.input), Array(8).fill(0.5), 1e-6, 'gradient');
  assert.deepEqual(r.outputs.alpha.shape, ['2', '1']);
  assertClose(readFloat32(r.outputs.alpha), x.map((row) => 0.5 * row.reduce((a, b) => a + b) + 0.1), 1e-5, 'output');

  await assert.rejects(call(sensitivity, 'Compute', { model: 'nope', inputs: { input: float32Tensor(x) } }),
    (err) => err.code === grpc.status.NOT_FOUND && /nope/.test(err.details));

  const good = (id) => ({ request_id: id, model: 'dense2', method: 'METHOD_GRADIENT', inputs: { input: float32Tensor(x) } });
  const bad = { request_id: 'bad', model: 'dense2', inputs: { input: float32Tensor([[1, 2, 3]]) } };  // 3 columns, not 4
  const answers = await stream(sensitivity, [good('a'), bad, good('b')]);
  assert.deepEqual(answers.map((a) => [a.request_id, a.result]), [['a', 'response'], ['bad', 'error'], ['b', 'response']]);
  assert.equal(answers[1].error.code, grpc.status.INVALID_ARGUMENT);
  assertClose(readFloat32(answers[2].response.attributions.input), Array(8).fill(0.5), 1e-6, 'stream gradient');

  const reflected = await reflectV1(target, 'gradserve.v1.SensitivityService.Compute');
  assert.ok(reflected.file_descriptor_response, `reflection v1 answered ${JSON.stringify(reflected.error_response)}`);

  console.log(`models: ${names.join(', ')}; gradient ${readFloat32(r.attributions.input)[0]}; ` +
              `stream: ${answers.map((a) => `${a.request_id}=${a.result}`).join(' ')} ` +
              `(${answers[1].error.message}); unknown model: NOT_FOUND; reflection v1: ok`);
  models.close();
  sensitivity.close();
}

main(process.argv[2] || '127.0.0.1:50051').catch((err) => {
  console.error(err);
  process.exit(1);
});
