// Command driver plays an MQTT scenario against a broker with the Eclipse Paho Go clients:
// paho.golang for MQTT 5, paho.mqtt.golang for 3.1.1. tests/conformance.rs writes the
// scenario and judges what this program saw; nothing here knows what the spec requires.
//
//	driver --broker 127.0.0.1:1883 < scenario.json
//
// The scenario is a JSON array of steps, run in order (tests/common/drivers.rs documents
// them). What the clients observe is printed as one JSON object per line: "connack",
// "suback", "unsuback", "message" and "disconnect" (the server's DISCONNECT or a closed
// socket, reported in the inbox in arrival order) events. A client error (refused
// connection, timeout, a step on a lost connection) exits 1 with the error on stderr.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/url"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/eclipse/paho.golang/paho"
	mqtt "github.com/eclipse/paho.mqtt.golang"
)

// Step is one action of a scenario; which fields count depends on Op.
type Step struct {
	Op        string   `json:"op"`
	Client    string   `json:"client"`
	ClientID  string   `json:"id"`
	Version   int      `json:"version"`
	Clean     *bool    `json:"clean"`
	Expiry    *uint32  `json:"expiry"`
	Subs      []Sub    `json:"subs"`
	SubID     int      `json:"sub_id"`
	Filters   []string `json:"filters"`
	Topic     string   `json:"topic"`
	Payload   string   `json:"payload"`
	QoS       byte     `json:"qos"`
	Retain    bool     `json:"retain"`
	Alias     uint16   `json:"alias"`
	Count     int      `json:"count"`
	TimeoutMs int      `json:"timeout_ms"`
	Ms        int      `json:"ms"`
	Will      *Will    `json:"will"`
}

// Will is the Will Message of a CONNECT; Delay is MQTT 5's Will Delay Interval.
type Will struct {
	Topic   string  `json:"topic"`
	Payload string  `json:"payload"`
	QoS     byte    `json:"qos"`
	Retain  bool    `json:"retain"`
	Delay   *uint32 `json:"delay"`
}

// Sub is one topic filter of a SUBSCRIBE with its options.
type Sub struct {
	Filter            string `json:"filter"`
	QoS               byte   `json:"qos"`
	NoLocal           bool   `json:"nl"`
	RetainAsPublished bool   `json:"rap"`
	RetainHandling    byte   `json:"rh"`
}

// Message is a PUBLISH as a client received it.
type Message struct {
	Event   string  `json:"event"`
	Client  string  `json:"client"`
	Topic   string  `json:"topic"`
	Payload string  `json:"payload"`
	QoS     byte    `json:"qos"`
	Retain  bool    `json:"retain"`
	Dup     bool    `json:"dup"`
	SubIDs  []int   `json:"sub_ids"`
	Expiry  *uint32 `json:"expiry"`
}

// Client is one connection, MQTT 5 or 3.1.1, behind the same few calls.
type Client interface {
	Subscribe(subs []Sub, id int) ([]byte, error)
	Unsubscribe(filters []string) ([]byte, error)
	Publish(s Step) error
	// PublishMany sends count messages back to back, then waits for their acknowledgements.
	PublishMany(topic string, count int, qos byte) error
	Disconnect() error
	// Drop closes the connection without DISCONNECT.
	Drop()
}

// Disconnected is the end of a connection the client did not ask for: a server DISCONNECT
// (MQTT 5, with its Reason Code) or a closed socket (Reason nil).
type Disconnected struct {
	Event  string `json:"event"`
	Client string `json:"client"`
	Reason *byte  `json:"reason"`
}

// Inbox holds what one client received (Message, Disconnected) until a "receive" step
// takes it.
type Inbox struct {
	mu       sync.Mutex
	changed  chan struct{}
	messages []any
}

func newInbox() *Inbox { return &Inbox{changed: make(chan struct{}, 1)} }

func (b *Inbox) push(m any) {
	b.mu.Lock()
	b.messages = append(b.messages, m)
	b.mu.Unlock()
	select {
	case b.changed <- struct{}{}:
	default:
	}
}

// take waits until count messages are there or timeout passes, and returns at most count.
func (b *Inbox) take(count int, timeout time.Duration) []any {
	deadline := time.After(timeout)
	for {
		b.mu.Lock()
		if len(b.messages) >= count {
			out := b.messages[:count]
			b.messages = append([]any(nil), b.messages[count:]...)
			b.mu.Unlock()
			return out
		}
		b.mu.Unlock()
		select {
		case <-b.changed:
		case <-deadline:
			b.mu.Lock()
			out := b.messages
			b.messages = nil
			b.mu.Unlock()
			return out
		}
	}
}

const patience = 10 * time.Second

var broker string

func main() {
	flag.StringVar(&broker, "broker", "127.0.0.1:1883", "host:port of the MQTT server")
	flag.Parse()
	var steps []Step
	if err := json.NewDecoder(os.Stdin).Decode(&steps); err != nil {
		fail(fmt.Errorf("reading the scenario: %w", err))
	}
	clients := map[string]Client{}
	inboxes := map[string]*Inbox{}
	out := json.NewEncoder(os.Stdout)
	for i, s := range steps {
		if err := run(s, clients, inboxes, out); err != nil {
			fail(fmt.Errorf("step %d (%s %s): %w", i, s.Op, s.Client, err))
		}
	}
	for _, c := range clients {
		c.Drop()
	}
}

func run(s Step, clients map[string]Client, inboxes map[string]*Inbox, out *json.Encoder) error {
	if s.Op != "connect" && s.Op != "sleep" && s.Op != "receive" && clients[s.Client] == nil {
		return errors.New("no such connected client")
	}
	switch s.Op {
	case "connect":
		if inboxes[s.Client] == nil {
			inboxes[s.Client] = newInbox()
		}
		var c Client
		var present bool
		var reason byte
		var err error
		if s.Version == 4 {
			c, present, reason, err = connect4(s, inboxes[s.Client])
		} else {
			c, present, reason, err = connect5(s, inboxes[s.Client])
		}
		if err != nil {
			return err
		}
		clients[s.Client] = c
		return out.Encode(map[string]any{"event": "connack", "client": s.Client, "session_present": present, "reason": reason})
	case "subscribe":
		codes, err := clients[s.Client].Subscribe(s.Subs, s.SubID)
		if err != nil {
			return err
		}
		return out.Encode(map[string]any{"event": "suback", "client": s.Client, "codes": ints(codes)})
	case "unsubscribe":
		codes, err := clients[s.Client].Unsubscribe(s.Filters)
		if err != nil {
			return err
		}
		return out.Encode(map[string]any{"event": "unsuback", "client": s.Client, "codes": ints(codes)})
	case "publish":
		return clients[s.Client].Publish(s)
	case "publish_many":
		return clients[s.Client].PublishMany(s.Topic, s.Count, s.QoS)
	case "receive":
		inbox := inboxes[s.Client]
		if inbox == nil {
			return errors.New("no such client")
		}
		for _, m := range inbox.take(s.Count, time.Duration(s.TimeoutMs)*time.Millisecond) {
			if err := out.Encode(m); err != nil {
				return err
			}
		}
		return nil
	case "disconnect":
		err := clients[s.Client].Disconnect()
		delete(clients, s.Client)
		return err
	case "drop":
		clients[s.Client].Drop()
		delete(clients, s.Client)
		return nil
	case "sleep":
		time.Sleep(time.Duration(s.Ms) * time.Millisecond)
		return nil
	}
	return fmt.Errorf("unknown op %q", s.Op)
}

// ints keeps codes numbers in JSON ([]byte would be base64).
func ints(codes []byte) []int {
	out := make([]int, len(codes))
	for i, c := range codes {
		out[i] = int(c)
	}
	return out
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "driver:", err)
	os.Exit(1)
}

// --- MQTT 5: paho.golang ---

type client5 struct {
	c    *paho.Client
	conn net.Conn
	// ending is set before the client itself ends the connection, which is then not reported.
	ending *atomic.Bool
}

func connect5(s Step, inbox *Inbox) (Client, bool, byte, error) {
	conn, err := net.DialTimeout("tcp", broker, patience)
	if err != nil {
		return nil, false, 0, err
	}
	name := s.Client
	ending := &atomic.Bool{}
	reported := &atomic.Bool{}
	c := paho.NewClient(paho.ClientConfig{
		Conn: conn,
		OnServerDisconnect: func(d *paho.Disconnect) {
			if !ending.Load() && !reported.Swap(true) {
				inbox.push(Disconnected{Event: "disconnect", Client: name, Reason: &d.ReasonCode})
			}
		},
		OnClientError: func(error) {
			if !ending.Load() && !reported.Swap(true) {
				inbox.push(Disconnected{Event: "disconnect", Client: name})
			}
		},
		OnPublishReceived: []func(paho.PublishReceived) (bool, error){
			func(r paho.PublishReceived) (bool, error) {
				p := r.Packet
				m := Message{Event: "message", Client: name, Topic: p.Topic, Payload: string(p.Payload),
					QoS: p.QoS, Retain: p.Retain, Dup: p.Duplicate(), SubIDs: []int{}}
				if p.Properties != nil {
					// paho.golang keeps one Subscription Identifier per PUBLISH.
					if p.Properties.SubscriptionIdentifier != nil {
						m.SubIDs = []int{*p.Properties.SubscriptionIdentifier}
					}
					m.Expiry = p.Properties.MessageExpiry
				}
				inbox.push(m)
				return true, nil
			},
		},
	})
	cp := &paho.Connect{ClientID: s.ClientID, KeepAlive: 30, CleanStart: s.Clean == nil || *s.Clean,
		Properties: &paho.ConnectProperties{SessionExpiryInterval: s.Expiry}}
	if w := s.Will; w != nil {
		cp.WillMessage = &paho.WillMessage{Topic: w.Topic, Payload: []byte(w.Payload), QoS: w.QoS, Retain: w.Retain}
		cp.WillProperties = &paho.WillProperties{WillDelayInterval: w.Delay}
	}
	ctx, cancel := context.WithTimeout(context.Background(), patience)
	defer cancel()
	ca, err := c.Connect(ctx, cp)
	if err != nil {
		conn.Close()
		return nil, false, 0, err
	}
	return &client5{c, conn, ending}, ca.SessionPresent, ca.ReasonCode, nil
}

func (c *client5) Subscribe(subs []Sub, id int) ([]byte, error) {
	sp := &paho.Subscribe{}
	for _, s := range subs {
		sp.Subscriptions = append(sp.Subscriptions, paho.SubscribeOptions{Topic: s.Filter, QoS: s.QoS,
			NoLocal: s.NoLocal, RetainAsPublished: s.RetainAsPublished, RetainHandling: s.RetainHandling})
	}
	if id != 0 {
		sp.Properties = &paho.SubscribeProperties{SubscriptionIdentifier: &id}
	}
	ctx, cancel := context.WithTimeout(context.Background(), patience)
	defer cancel()
	sa, err := c.c.Subscribe(ctx, sp)
	if sa != nil {
		// Refused filters are a result to report, not an error of the client.
		return sa.Reasons, nil
	}
	return nil, err
}

func (c *client5) Unsubscribe(filters []string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(context.Background(), patience)
	defer cancel()
	ua, err := c.c.Unsubscribe(ctx, &paho.Unsubscribe{Topics: filters})
	if ua != nil {
		return ua.Reasons, nil
	}
	return nil, err
}

func (c *client5) Publish(s Step) error {
	p := &paho.Publish{Topic: s.Topic, QoS: s.QoS, Retain: s.Retain, Payload: []byte(s.Payload),
		Properties: &paho.PublishProperties{MessageExpiry: s.Expiry}}
	if s.Alias != 0 {
		p.Properties.TopicAlias = &s.Alias
	}
	ctx, cancel := context.WithTimeout(context.Background(), patience)
	defer cancel()
	r, err := c.c.Publish(ctx, p)
	if err != nil {
		return err
	}
	if r.ReasonCode >= 0x80 {
		return fmt.Errorf("publish refused: reason 0x%02x", r.ReasonCode)
	}
	return nil
}

func (c *client5) PublishMany(topic string, count int, qos byte) error {
	// AsyncSend queues each in the session in call order and returns without an outcome;
	// the last one is sent waiting, and the server answers a connection's packets in order.
	ctx, cancel := context.WithTimeout(context.Background(), patience)
	defer cancel()
	for i := 0; i < count; i++ {
		method := paho.PublishMethod_AsyncSend
		if i == count-1 {
			method = paho.PublishMethod_Blocking
		}
		p := &paho.Publish{Topic: topic, QoS: qos, Payload: []byte(fmt.Sprint(i))}
		if _, err := c.c.PublishWithOptions(ctx, p, paho.PublishOptions{Method: method}); err != nil {
			return err
		}
	}
	return nil
}

func (c *client5) Disconnect() error {
	c.ending.Store(true)
	err := c.c.Disconnect(&paho.Disconnect{ReasonCode: 0})
	<-c.c.Done()
	return err
}

func (c *client5) Drop() {
	c.ending.Store(true)
	c.conn.Close()
}

// --- MQTT 3.1.1: paho.mqtt.golang ---

type client4 struct {
	c    mqtt.Client
	mu   sync.Mutex
	conn net.Conn
	// ending is set before the client itself ends the connection, which is then not reported.
	ending atomic.Bool
}

func connect4(s Step, inbox *Inbox) (Client, bool, byte, error) {
	c4 := &client4{}
	name := s.Client
	opts := mqtt.NewClientOptions().
		AddBroker("tcp://" + broker).
		SetClientID(s.ClientID).
		SetProtocolVersion(4).
		SetCleanSession(s.Clean == nil || *s.Clean).
		SetKeepAlive(30 * time.Second).
		SetAutoReconnect(false).
		SetConnectRetry(false).
		SetOrderMatters(true).
		SetConnectionLostHandler(func(mqtt.Client, error) {
			if !c4.ending.Load() {
				inbox.push(Disconnected{Event: "disconnect", Client: name})
			}
		}).
		SetDefaultPublishHandler(func(_ mqtt.Client, m mqtt.Message) {
			inbox.push(Message{Event: "message", Client: name, Topic: m.Topic(), Payload: string(m.Payload()),
				QoS: m.Qos(), Retain: m.Retained(), Dup: m.Duplicate(), SubIDs: []int{}})
		}).
		SetCustomOpenConnectionFn(func(uri *url.URL, _ mqtt.ClientOptions) (net.Conn, error) {
			conn, err := net.DialTimeout("tcp", uri.Host, patience)
			c4.mu.Lock()
			c4.conn = conn
			c4.mu.Unlock()
			return conn, err
		})
	if w := s.Will; w != nil {
		opts.SetWill(w.Topic, w.Payload, w.QoS, w.Retain)
	}
	c4.c = mqtt.NewClient(opts)
	t := c4.c.Connect()
	if !t.WaitTimeout(patience) {
		return nil, false, 0, errors.New("no CONNACK")
	}
	ct := t.(*mqtt.ConnectToken)
	if t.Error() != nil {
		return nil, false, ct.ReturnCode(), t.Error()
	}
	return c4, ct.SessionPresent(), ct.ReturnCode(), nil
}

func wait(t mqtt.Token) error {
	if !t.WaitTimeout(patience) {
		return errors.New("no answer in time")
	}
	return t.Error()
}

// Subscribe reports the codes in the order of subs: paho.mqtt.golang hands them back by filter.
func (c *client4) Subscribe(subs []Sub, _ int) ([]byte, error) {
	filters := map[string]byte{}
	for _, s := range subs {
		filters[s.Filter] = s.QoS
	}
	t := c.c.SubscribeMultiple(filters, nil)
	if err := wait(t); err != nil {
		return nil, err
	}
	result := t.(*mqtt.SubscribeToken).Result()
	codes := make([]byte, len(subs))
	for i, s := range subs {
		codes[i] = result[s.Filter]
	}
	return codes, nil
}

// Unsubscribe: a 3.1.1 UNSUBACK has no codes.
func (c *client4) Unsubscribe(filters []string) ([]byte, error) {
	return []byte{}, wait(c.c.Unsubscribe(filters...))
}

func (c *client4) Publish(s Step) error {
	return wait(c.c.Publish(s.Topic, s.QoS, s.Retain, []byte(s.Payload)))
}

func (c *client4) PublishMany(topic string, count int, qos byte) error {
	tokens := make([]mqtt.Token, count)
	for i := range tokens {
		tokens[i] = c.c.Publish(topic, qos, false, []byte(fmt.Sprint(i)))
	}
	for _, t := range tokens {
		if err := wait(t); err != nil {
			return err
		}
	}
	return nil
}

func (c *client4) Disconnect() error {
	c.ending.Store(true)
	c.c.Disconnect(1000)
	return nil
}

func (c *client4) Drop() {
	c.ending.Store(true)
	c.mu.Lock()
	if c.conn != nil {
		c.conn.Close()
	}
	c.mu.Unlock()
}
