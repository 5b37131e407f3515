// Plays an MQTT scenario against a broker with MQTT.js (MQTT 5 and 3.1.1).
// tests/conformance.rs writes the scenario and judges what this program saw; nothing here
// knows what the spec requires.
//
//   node driver.js --broker 127.0.0.1:1883 < scenario.json
//
// The scenario is a JSON array of steps, run in order (tests/common/drivers.rs documents
// them), the same language as tests/clients/go. What the clients observe is printed as one
// JSON object per line: "connack", "suback", "unsuback", "message" and "disconnect" (the
// server's DISCONNECT or a closed socket, reported in the inbox in arrival order) events. A
// client error (refused connection, timeout, a step on a lost connection) exits 1 with the
// error on stderr.
'use strict'

const mqtt = require('mqtt')

const PATIENCE_MS = 10000

function arg (name, fallback) {
  const i = process.argv.indexOf(name)
  return i >= 0 ? process.argv[i + 1] : fallback
}

function emit (event) {
  process.stdout.write(JSON.stringify(event) + '\n')
}

function readStdin () {
  return new Promise((resolve, reject) => {
    let text = ''
    process.stdin.setEncoding('utf8')
    process.stdin.on('data', (chunk) => { text += chunk })
    process.stdin.on('end', () => resolve(text))
    process.stdin.on('error', reject)
  })
}

function timeout (promise, what) {
  let timer
  return Promise.race([
    promise,
    new Promise((resolve, reject) => {
      timer = setTimeout(() => reject(new Error(`${what}: no answer in time`)), PATIENCE_MS)
    })
  ]).finally(() => clearTimeout(timer))
}

// What one client received until a "receive" step takes it.
class Inbox {
  constructor () {
    this.messages = []
    this.wake = null
  }

  push (message) {
    this.messages.push(message)
    if (this.wake) this.wake()
  }

  // Waits until count messages are there or timeoutMs passes; returns at most count.
  async take (count, timeoutMs) {
    const deadline = Date.now() + timeoutMs
    while (this.messages.length < count && Date.now() < deadline) {
      await new Promise((resolve) => {
        const timer = setTimeout(resolve, deadline - Date.now())
        this.wake = () => { clearTimeout(timer); resolve() }
      })
      this.wake = null
    }
    return this.messages.splice(0, count)
  }
}

async function connect (broker, step, inbox) {
  const [host, port] = broker.split(':')
  const v5 = step.version !== 4
  const options = {
    host,
    port: Number(port),
    clientId: step.id,
    protocolVersion: v5 ? 5 : 4,
    clean: step.clean === undefined ? true : step.clean,
    keepalive: 30,
    reconnectPeriod: 0,
    connectTimeout: PATIENCE_MS,
    resubscribe: false
  }
  if (v5 && step.expiry !== undefined) {
    options.properties = { sessionExpiryInterval: step.expiry }
  }
  if (step.will) {
    const w = step.will
    options.will = { topic: w.topic, payload: Buffer.from(w.payload || ''), qos: w.qos || 0, retain: !!w.retain }
    if (v5 && w.delay !== undefined) options.will.properties = { willDelayInterval: w.delay }
  }
  const client = mqtt.connect(options)
  client.on('message', (topic, payload, packet) => {
    const props = packet.properties || {}
    let ids = props.subscriptionIdentifier
    if (ids === undefined) ids = []
    if (!Array.isArray(ids)) ids = [ids]
    inbox.push({
      event: 'message',
      client: step.client,
      topic,
      payload: payload.toString('utf8'),
      qos: packet.qos,
      retain: packet.retain,
      dup: packet.dup,
      sub_ids: ids,
      expiry: props.messageExpiryInterval === undefined ? null : props.messageExpiryInterval
    })
  })
  const connack = await timeout(new Promise((resolve, reject) => {
    client.once('connect', resolve)
    client.once('error', reject)
  }), 'CONNECT')
  client.on('error', (err) => fail(new Error(`${step.client}: ${err.message}`)))
  // An end the client did not ask for goes to the inbox, once: DISCONNECT, or the socket.
  let reported = false
  client.on('disconnect', (packet) => {
    if (client.endedByDriver || reported) return
    reported = true
    inbox.push({ event: 'disconnect', client: step.client, reason: packet.reasonCode || 0 })
  })
  client.on('close', () => {
    if (client.endedByDriver || reported) return
    reported = true
    inbox.push({ event: 'disconnect', client: step.client, reason: null })
  })
  return { client, connack }
}

async function run (broker, steps) {
  const clients = new Map()
  const inboxes = new Map()
  for (const [i, step] of steps.entries()) {
    const client = clients.get(step.client)
    if (!['connect', 'sleep', 'receive'].includes(step.op) && !client) {
      throw new Error(`step ${i} (${step.op} ${step.client}): no such connected client`)
    }
    try {
      switch (step.op) {
        case 'connect': {
          if (!inboxes.has(step.client)) inboxes.set(step.client, new Inbox())
          const c = await connect(broker, step, inboxes.get(step.client))
          clients.set(step.client, c.client)
          emit({ event: 'connack', client: step.client, session_present: c.connack.sessionPresent, reason: c.connack.reasonCode || 0 })
          break
        }
        case 'subscribe': {
          const map = {}
          for (const s of step.subs) {
            map[s.filter] = { qos: s.qos || 0, nl: !!s.nl, rap: !!s.rap, rh: s.rh || 0 }
          }
          const opts = step.sub_id ? { properties: { subscriptionIdentifier: step.sub_id } } : {}
          let suback
          try {
            suback = await timeout(client.subscribeAsync(map, opts), 'SUBSCRIBE')
          } catch (err) {
            // Refused filters are a result to report, not an error of the client.
            if (!err.packet) throw err
            suback = err.packet
          }
          // Granted: [{ topic, qos }] in SUBSCRIBE order; refused: the SUBACK packet.
          const codes = Array.isArray(suback) ? suback.map((g) => g.qos) : suback.granted
          emit({ event: 'suback', client: step.client, codes })
          break
        }
        case 'unsubscribe': {
          const unsuback = await timeout(client.unsubscribeAsync(step.filters), 'UNSUBSCRIBE')
          // A 3.1.1 UNSUBACK has no codes.
          emit({ event: 'unsuback', client: step.client, codes: (unsuback && unsuback.granted) || [] })
          break
        }
        case 'publish': {
          const opts = { qos: step.qos || 0, retain: !!step.retain }
          const properties = {}
          if (step.expiry !== undefined) properties.messageExpiryInterval = step.expiry
          if (step.alias) properties.topicAlias = step.alias
          if (Object.keys(properties).length) opts.properties = properties
          const ack = await timeout(client.publishAsync(step.topic || '', step.payload || '', opts), 'PUBLISH')
          if (ack && ack.reasonCode >= 0x80) throw new Error(`publish refused: reason ${ack.reasonCode}`)
          break
        }
        case 'publish_many': {
          // Sent back to back in call order; the acknowledgements are awaited together.
          const acks = []
          for (let n = 0; n < step.count; n++) {
            acks.push(client.publishAsync(step.topic, String(n), { qos: step.qos || 0 }))
          }
          await timeout(Promise.all(acks), 'PUBLISH')
          break
        }
        case 'receive': {
          const inbox = inboxes.get(step.client)
          if (!inbox) throw new Error('no such client')
          for (const m of await inbox.take(step.count, step.timeout_ms)) emit(m)
          break
        }
        case 'disconnect':
          client.endedByDriver = true
          await timeout(client.endAsync(), 'DISCONNECT')
          clients.delete(step.client)
          break
        case 'drop':
          client.endedByDriver = true
          client.removeAllListeners('error')
          client.on('error', () => {})
          client.stream.destroy()
          await client.endAsync(true)
          clients.delete(step.client)
          break
        case 'sleep':
          await new Promise((resolve) => setTimeout(resolve, step.ms))
          break
        default:
          throw new Error(`unknown op ${step.op}`)
      }
    } catch (err) {
      throw new Error(`step ${i} (${step.op} ${step.client}): ${err.message}`)
    }
  }
  for (const client of clients.values()) {
    client.removeAllListeners('error')
    client.on('error', () => {})
    client.stream.destroy()
    await client.endAsync(true)
  }
}

function fail (err) {
  process.stderr.write(`driver: ${err.message}\n`)
  process.exit(1)
}

readStdin()
  .then((text) => run(arg('--broker', '127.0.0.1:1883'), JSON.parse(text)))
  .then(() => process.exit(0), fail)
